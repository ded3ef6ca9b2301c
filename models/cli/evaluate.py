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

from models import cli
from models.evaluation import DTYPES, VARIANTS


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
  cli.add_data_arguments(parser)
  args = parser.parse_args(argv)
  # JAX and the model load after parsing, so --help and argument errors answer at once.
  import jax  # pylint: disable=g-import-not-at-top
  from models import evaluation, sharding  # pylint: disable=g-import-not-at-top
  try:
    mesh = sharding.make_mesh(sharding.parse_mesh(args.mesh, {"data": jax.device_count()}))
  except ValueError as e:
    raise SystemExit(f"--mesh: {e}")
  source_fn = lambda vocab: cli.make_source(args, vocab, tokenizer_dirs=(args.checkpoint,))
  try:
    results = evaluation.evaluate_checkpoint(
        args.checkpoint, source_fn, variants=args.attention, num_examples=args.num_examples,
        batch_size=args.batch_size, block_size=args.block_size, topk=args.topk,
        index_score_dtype=args.index_score_dtype,
        indexer_metrics=not args.no_indexer_metrics, indexer_seed=args.indexer_seed,
        dtype=args.dtype, mesh=mesh, implementation=args.implementation,
        dense_implementation=args.dense_implementation, progress=not args.quiet)
  except ValueError as e:
    raise SystemExit(f"evaluate: {e}")
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
