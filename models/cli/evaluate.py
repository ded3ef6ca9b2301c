"""Evaluate a MiniMax-M3-family model: retrieval accuracy, perplexity and indexer recall.

Runs the model over held-out examples (the eval split, which training never reads) and reports:

* ``accuracy``: the share of scored targets predicted by argmax. On the synthetic retrieval task
  (``--task retrieval``) only the queried values are scored: retrieval accuracy. On text
  (``--task text``) every token: next-token accuracy.
* ``loss`` and ``perplexity`` = exp(loss) over the same targets.
* indexer metrics for every MSA layer (paper §5.2, docs/msa.md §5; definitions in
  models/metrics.py): ``block_recall`` = |I* ∩ Î| / |I*| and ``score_recall`` = attention
  mass of I* that Î captures, where Î is the index branch's top-k selection and I* the main
  branch's own top-k blocks by (group-mean) full causal attention mass; averaged over all
  queries, as ``*_beyond_k`` over the queries with more than k visible blocks, and as
  ``*_scored`` (``blk_rec@t`` in the table) over the queries whose next token is scored (on
  the retrieval task: the queries that must find a stored pair). Two diagnostics:
  ``block_recall_maxpool`` (``blk_max``) ranks I* by each block's largest token probability,
  MSA's own pooling, instead of its summed mass; ``oracle_block_recall`` (``oracle``) is the
  summed-mass block recall a perfect KL-trained indexer would reach (its selection is the
  max-pooled I*), so it bounds what indexer training alone can do.

``--attention`` takes one or more variants, evaluated on the same examples:
``dense`` (every layer dense), ``msa`` (MSA layers select with the index branch) and
``msa-random-indexer`` (MSA with freshly initialised, untrained index projections: the
baseline a trained indexer must beat). ``--block-size`` and ``--topk`` change the selection
of the loaded weights (e.g. a smaller budget than in training).

``--checkpoint`` is a fine-tuning run folder (scripts/finetune.py --output-dir; its latest
checkpoint), an Orbax model folder (a run's ``model/``, scripts/convert.py) or a Hugging Face
folder. Text is tokenised with ``--tokenizer`` or the checkpoint folder's tokenizer.json
(UTF-8 bytes when there is none).

Examples:
  python3 scripts/evaluate.py --checkpoint runs/msa --task retrieval --seq-len 8192 \\
      --attention dense msa msa-random-indexer --num-examples 256 --output-json eval.json
  python3 scripts/evaluate.py --checkpoint runs/msa --task text --text-files val.jsonl
"""

from __future__ import annotations

import argparse
import json
import os

from models import cli
from models import data as data_lib

VARIANTS = ("dense", "msa", "msa-random-indexer")
DTYPES = ("bfloat16", "float32")


# ----------------------------------------------------------------------------- shared CLI bits


def add_data_arguments(parser: argparse.ArgumentParser):
  g = parser.add_argument_group("data")
  g.add_argument("--task", choices=["retrieval", "text"], default="retrieval",
                 help="synthetic long-context key->value retrieval, or tokenised text "
                      "(default: retrieval)")
  g.add_argument("--seq-len", type=int, default=256,
                 help="tokens per example fed to the model (default 256)")
  g.add_argument("--num-pairs", type=int, default=8,
                 help="retrieval: key->value pairs hidden per example (default 8)")
  g.add_argument("--num-queries", type=int, default=1,
                 help="retrieval: queried keys at the end of each example, each a scored "
                      "target (default 1)")
  g.add_argument("--repeats", type=int, default=1,
                 help="retrieval: store each pair this many times; values of the later "
                      "occurrences are scored targets too (a denser training signal; "
                      "default 1)")
  g.add_argument("--fused-pairs", action="store_true",
                 help="retrieval: store each pair as one token naming its key and value "
                      "(16 values): the lookup is one attention step, no induction circuit "
                      "to form first (models/data.py)")
  g.add_argument("--text-files", nargs="+", default=[],
                 help="text: .txt (one document per file) and/or .jsonl files")
  g.add_argument("--text-field", default="text", help="text: the .jsonl field (default text)")
  g.add_argument("--tokenizer", default=None,
                 help="tokenizer.json (or a folder with one); default: the checkpoint's, "
                      "else UTF-8 bytes")
  g.add_argument("--eos-id", type=int, default=None,
                 help="text: a token id appended after every document")
  g.add_argument("--eval-fraction", type=float, default=0.05,
                 help="text: share of the packed windows held out as the eval split "
                      "(default 0.05)")
  g.add_argument("--data-seed", type=int, default=0,
                 help="seed of the data (retrieval examples, text shuffling; default 0)")


def make_source(args, vocab_size: int, tokenizer_dirs=()):
  """The data source the ``add_data_arguments`` flags describe."""
  if args.task == "retrieval":
    try:
      return data_lib.RetrievalTask(vocab_size, args.seq_len, num_pairs=args.num_pairs,
                                    num_queries=args.num_queries, seed=args.data_seed,
                                    repeats=args.repeats, fused=args.fused_pairs)
    except ValueError as e:
      raise SystemExit(f"retrieval task: {e}")
  if not args.text_files:
    raise SystemExit("--task text needs --text-files")
  path = args.tokenizer
  for folder in tokenizer_dirs:
    if path is None and folder and os.path.exists(os.path.join(folder, "tokenizer.json")):
      path = os.path.join(folder, "tokenizer.json")
  tokenizer = data_lib.load_tokenizer(path)
  try:
    return data_lib.TextDataset(args.text_files, tokenizer, args.seq_len,
                                text_field=args.text_field, eos_id=args.eos_id,
                                eval_fraction=args.eval_fraction, seed=args.data_seed,
                                vocab_size=vocab_size)
  except (ValueError, OSError) as e:
    raise SystemExit(f"text data: {e}")


# ----------------------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=cli.HelpFormatter)
  parser.add_argument("--checkpoint", required=True,
                      help="run folder, Orbax model folder or Hugging Face folder")
  parser.add_argument("--attention", nargs="+", default=["dense", "msa"], choices=VARIANTS,
                      metavar="VARIANT",
                      help=f"one or more of {', '.join(VARIANTS)} (default: dense msa)")
  parser.add_argument("--num-examples", type=int, default=64,
                      help="held-out examples (rounded up to whole batches; default 64)")
  parser.add_argument("--batch-size", type=int, default=8,
                      help="examples per batch, divisible by data x fsdp (default 8)")
  parser.add_argument("--block-size", type=int, default=None,
                      help="override the MSA block size Bk of the checkpoint")
  parser.add_argument("--index-score-dtype", default=None, choices=["float8_e4m3fn"],
                      help="score the index in this precision (default: the model's dtype)")
  parser.add_argument("--topk", type=int, default=None,
                      help="override the blocks per query k of the checkpoint")
  parser.add_argument("--no-indexer-metrics", action="store_true",
                      help="skip block/score recall (they cost a dense pass per MSA layer)")
  parser.add_argument("--indexer-seed", type=int, default=1234,
                      help="seed of the index projections of msa-random-indexer (default "
                           "1234; not finetune's default --seed 0, which drew the initial "
                           "index projections of a converted model: that control would be the "
                           "conversion's own starting point)")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                      help="activation and parameter dtype (default: bfloat16 on GPUs and "
                           "TPUs, float32 on CPUs)")
  parser.add_argument("--mesh", default=None,
                      help="e.g. data=2,fsdp=4 (default: all devices on data)")
  parser.add_argument("--implementation", default=None,
                      choices=["xla", "pallas_gpu", "pallas_tpu"],
                      help="MSA implementation (default: the backend's best)")
  parser.add_argument("--dense-implementation", default=None, choices=["xla", "cudnn"],
                      help="jax.nn.dot_product_attention implementation (default xla)")
  parser.add_argument("--output-json", default=None, help="write the results here")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  add_data_arguments(parser)
  args = parser.parse_args(argv)
  # JAX and the model load after parsing, so --help and argument errors answer at once.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from models import metrics, sharding, training  # pylint: disable=g-import-not-at-top

  variants = list(dict.fromkeys(args.attention))  # in order, once each
  args.dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  dtype = jnp.dtype(args.dtype)
  mesh = sharding.make_mesh(sharding.parse_mesh(args.mesh, {"data": jax.device_count()}))
  try:
    config, params = training.load_params(args.checkpoint)
  except (ValueError, OSError) as e:
    raise SystemExit(f"--checkpoint {args.checkpoint}: {e}")
  config = training.override_config(config, index_block_size=args.block_size,
                                    index_topk_blocks=args.topk,
                                    index_score_dtype=args.index_score_dtype)
  if any(v != "dense" for v in variants) and not any(config.sparse_layers):
    raise SystemExit("the model has no MSA layers: only --attention dense applies")
  model, _ = training.build_model(config, dtype=dtype, param_dtype=dtype,
                                  implementation=args.implementation, init_params=params)
  parts = training.ModelParts(model)
  params = parts.params(model)
  source = make_source(args, config.vocab_size, tokenizer_dirs=(args.checkpoint,))

  results = {"checkpoint": os.path.abspath(args.checkpoint), "data": source.describe(),
             "block_size": config.index_block_size, "topk": config.index_topk_blocks,
             "index_score_dtype": config.index_score_dtype, "variants": {}}
  for variant in variants:
    p = (training.randomize_index_params(params, config, args.indexer_seed)
         if variant == "msa-random-indexer" else params)
    attention = "dense" if variant == "dense" else "msa"
    results["variants"][variant] = metrics.evaluate(
        parts, p, source, num_examples=args.num_examples, batch_size=args.batch_size,
        attention=attention, indexer=not args.no_indexer_metrics, mesh=mesh,
        dense_implementation=args.dense_implementation, progress=not args.quiet)
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump(results, f, indent=1)
  print(f"{'variant':<20} {'accuracy':>9} {'loss':>8} {'ppl':>10} {'block_rec':>9} "
        f"{'score_rec':>9} {'blk_rec>k':>9} {'scr_rec>k':>9} {'blk_rec@t':>9} "
        f"{'blk_max':>9} {'oracle':>9}")
  fmt = lambda x: f"{x:9.4f}" if isinstance(x, float) else f"{'-':>9}"
  for name, r in results["variants"].items():
    print(f"{name:<20} {r['accuracy']:9.4f} {r['loss']:8.4f} {r['perplexity']:10.3f} "
          f"{fmt(r.get('block_recall'))} {fmt(r.get('score_recall'))} "
          f"{fmt(r.get('block_recall_beyond_k'))} {fmt(r.get('score_recall_beyond_k'))} "
          f"{fmt(r.get('block_recall_scored'))} {fmt(r.get('block_recall_maxpool'))} "
          f"{fmt(r.get('oracle_block_recall'))}")
  return 0


run = cli.console_command(main, compilation_cache=True)


if __name__ == "__main__":
  run()
