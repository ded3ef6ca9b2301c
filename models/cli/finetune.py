"""Train or fine-tune a MiniMax-M3-family model with MSA (Optax AdamW, sharded, resumable).

What trains (docs/msa.md §5, the MSA paper, arXiv 2606.13392):
  --mode full           every parameter (the MoE routing bias excepted) on
                        L = L_LM + λ·Σ_layers L_KL (λ = --kl-weight; 0 = no KL).
  --mode indexer-only   the backbone frozen; only the index projections and their norms
                        train, on λ·Σ_layers L_KL.
The index branch reads a detached copy of the hidden state and top-k is not differentiable, so
L_LM never reaches the index projections and L_KL reaches nothing else (paper Eq. 11).

Attention schedule:
  --dense-warmup-steps N  steps 1..N run dense attention while the indexer learns (paper §7.3
                          stage 1: KL over the whole causal context; --dense-kl-support
                          selected uses the indexer's own top-k blocks instead, and
                          causal_block the causal context pooled to KV blocks: teacher block
                          mass against max-pooled index scores, beyond the paper); later
                          steps run --attention.
  --attention msa|dense   after the warm-up: MSA (KL over the selected blocks, stage 2) or
                          dense (dense training, e.g. from scratch before a conversion).

Model: --config (a preset in models/configs/ or a config.json; default tiny) with size overrides
(--num-layers, --hidden-size, ..., --sparse-layers, --block-size, --topk), randomly
initialised from --seed; or --init-from a previous run folder, an Orbax model folder or a HF
folder, keeping its weights and adding fresh index projections where the new config has MSA
layers the checkpoint lacks (converting a dense model: --init-from DENSE_RUN
--sparse-layers all).

Data (--task): the synthetic long-context retrieval task (key->value pairs hidden in filler,
loss on the queried values; --seq-len, --num-pairs, --num-queries) or text (--text-files
.txt/.jsonl, tokenised with the checkpoint's tokenizer.json or --tokenizer, packed into
--seq-len windows). Examples are a pure function of (--data-seed, index), so a resumed run
reads exactly the examples the uninterrupted one would have.

Optimisation: AdamW (--lr peak, --lr-warmup-steps linear warm-up, cosine decay to
--min-lr-ratio·lr at --steps, --weight-decay on matrices, --clip-norm global-norm clipping).
--param-dtype bfloat16 stores the parameters in bf16 and keeps float32 master weights and
float32 AdamW moments in the optimizer state.

Parallelism: --mesh data=D,fsdp=F (default: all local devices on data). The global batch is
split over data x fsdp; parameters, master weights and optimizer state are sharded over fsdp
along their embedding axis (models/sharding.py rules).

Outputs in --output-dir: config.json (the model), args.json, metrics.jsonl (per step: loss,
lm_loss, kl, per-layer kl, grad_norm, grad_norm_index, lr, tokens_per_s, attention,
includes_compile; and eval records), curves.png (plotted at the end), checkpoints/<step>
(Orbax CheckpointManager: every --save-every steps and at the end, the last --keep kept), and
model/ (the final weights as an Orbax model folder that scripts/generate.py and
scripts/evaluate.py read).

Resuming: --resume continues from the latest checkpoint in --output-dir (parameters, master
weights, optimizer state, step and data position) and reproduces the uninterrupted run's losses
exactly; pass the same training flags. Without a checkpoint it starts fresh. --time-limit and
--stop-at end a run early with a checkpoint, to run in pieces.

Examples:
  # 1. dense from scratch on the retrieval task at 8K context
  python3 scripts/finetune.py --output-dir runs/dense --attention dense --kl-weight 0 \\
      --num-layers 6 --hidden-size 384 --num-heads 6 --num-kv-heads 2 --head-dim 64 \\
      --rotary-dim 32 --vocab-size 512 --sparse-layers none --moe-layers none \\
      --mlp-dim 1536 --seq-len 8192 --batch-size 8 --steps 4000 --lr 1e-3 \\
      --lr-warmup-steps 200 --param-dtype bfloat16 --dtype bfloat16 --remat \\
      --time-limit 25 --resume            # rerun the same line until it finishes
  # 2. convert: add index projections, KL warm-up with dense attention, then MSA with a
  #    budget of k*Bk = 8*128 = 1/8 of the context
  python3 scripts/finetune.py --output-dir runs/msa --init-from runs/dense \\
      --sparse-layers all --block-size 128 --topk 8 --dense-warmup-steps 300 \\
      --steps 1000 --lr 3e-4 --seq-len 8192 --batch-size 8 --param-dtype bfloat16 \\
      --dtype bfloat16 --remat --time-limit 25 --resume
  # 3. compare on the same held-out examples
  python3 scripts/evaluate.py --checkpoint runs/msa --seq-len 8192 \\
      --attention dense msa msa-random-indexer
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import checkpoint as checkpoint_lib
from models import cli
from models import config as config_lib
from models import evaluation
from models import metrics
from models import sharding
from models import training
from msa_jax import profiling

DTYPES = evaluation.DTYPES
# Settings that must not change when resuming (the data and the model they define).
DATA_KEYS = ("task", "seq_len", "num_pairs", "num_queries", "repeats", "fused_pairs",
             "text_files", "text_field", "eos_id", "eval_fraction", "data_seed", "batch_size")


# Every option of the command in --help's order, in one place (hence its length).
def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=cli.HelpFormatter)
  run = p.add_argument_group("run")
  run.add_argument("--output-dir", required=True,
                   help="run folder: checkpoints, metrics.jsonl, curves.png, model/")
  run.add_argument("--steps", type=int, default=100,
                   help="total optimizer steps of the run (the LR schedule ends here)")
  run.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --output-dir (fresh start "
                        "when there is none)")
  run.add_argument("--save-every", type=int, default=100,
                   help="checkpoint every N steps (and at the end; default 100)")
  run.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
  run.add_argument("--stop-at", type=int, default=None,
                   help="stop with a checkpoint after this step (run in pieces)")
  run.add_argument("--time-limit", type=float, default=None,
                   help="minutes of wall time for this invocation: stop with a checkpoint "
                        "when the next step would exceed it (leave a margin for start-up "
                        "outside Python)")
  run.add_argument("--profile-step", type=int, default=None,
                   help="trace this step (after compilation) with jax.profiler and print the "
                        "device time per kernel (GPU); the trace and profile_step.md go to "
                        "--output-dir/profile")
  run.add_argument("--eval-every", type=int, default=0,
                   help="evaluate on held-out examples every N steps and at the end (0 = "
                        "never): accuracy, loss, block/score recall")
  run.add_argument("--eval-examples", type=int, default=32,
                   help="held-out examples per evaluation (default 32)")
  run.add_argument("--quiet", action="store_true", help="no progress bar or per-step lines")

  model = p.add_argument_group("model")
  model.add_argument("--config", default="tiny",
                     help="preset name in models/configs/ (tiny, msa_109b, minimax_m3) or a "
                          "config.json path (default tiny); ignored with --init-from")
  model.add_argument("--init-from", default=None,
                     help="start from these weights: a run folder (latest checkpoint), an "
                          "Orbax model folder or a HF folder; missing index projections are "
                          "freshly initialised")
  model.add_argument("--seed", type=int, default=0,
                     help="seed of the initial parameters")
  for flag, field, text in (
      ("--num-layers", "num_layers", "decoder layers"),
      ("--hidden-size", "hidden_size", "d_model"),
      ("--num-heads", "num_heads", "query heads"),
      ("--num-kv-heads", "num_kv_heads", "KV heads = GQA groups = index query heads"),
      ("--head-dim", "head_dim", "head dimension"),
      ("--rotary-dim", "rotary_dim", "RoPE channels per head"),
      ("--vocab-size", "vocab_size", "vocabulary size"),
      ("--mlp-dim", "dense_intermediate_size", "dense MLP width"),
      ("--index-head-dim", "index_head_dim", "index head dimension Di"),
      ("--block-size", "index_block_size", "MSA KV block size Bk"),
      ("--topk", "index_topk_blocks", "MSA blocks per query k (own block included)")):
    model.add_argument(flag, type=int, default=None, dest=field, help=f"override: {text}")
  model.add_argument("--sparse-layers", default=None,
                     help="override which layers are MSA: all, none, from=N or 0/1 per layer")
  model.add_argument("--moe-layers", default=None,
                     help="override which layers are MoE: all, none, from=N or 0/1 per layer")
  model.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="activation dtype (default: bfloat16 on GPUs and TPUs, float32 on "
                          "CPUs; parameters keep --param-dtype)")
  model.add_argument("--param-dtype", choices=sorted(DTYPES), default="float32",
                     help="parameter storage dtype; bfloat16 keeps float32 master weights "
                          "and AdamW moments (default float32)")
  model.add_argument("--implementation", default=None,
                     choices=["xla", "pallas_gpu", "pallas_tpu"],
                     help="MSA implementation (default: the backend's best)")
  model.add_argument("--dense-implementation", default=None, choices=["xla", "cudnn"],
                     help="jax.nn.dot_product_attention implementation for dense attention "
                          "(default xla; cudnn = flash attention on GPU, bf16)")
  model.add_argument("--remat", action="store_true",
                     help="recompute each layer in the backward pass (less memory)")

  train = p.add_argument_group("training")
  train.add_argument("--mode", choices=list(training.MODES), default="full",
                     help="full: all parameters on LM + KL; indexer-only: index projections "
                          "on KL, backbone frozen (default full)")
  train.add_argument("--attention", choices=["msa", "dense"], default="msa",
                     help="attention after the dense warm-up")
  train.add_argument("--dense-warmup-steps", type=int, default=0,
                     help="first N steps with dense attention while the indexer learns "
                          "(paper §7.3; default 0)")
  train.add_argument("--dense-kl-support", choices=list(training.DENSE_KL_SUPPORTS),
                     default="causal",
                     help="KL while attention is dense: over the whole causal context (the "
                          "paper's warm-up), the indexer's top-k blocks, or causal_block: the "
                          "whole context pooled to KV blocks (teacher block mass against "
                          "max-pooled index scores; an extension beyond the paper)")
  train.add_argument("--kl-weight", type=float, default=1.0,
                     help="λ of L_LM + λ·Σ L_KL (0 = no KL, and the index projections "
                          "stay as they are, e.g. for dense pre-training)")
  train.add_argument("--batch-size", type=int, default=8,
                     help="global batch (examples per step), divisible by data x fsdp")
  train.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
  train.add_argument("--lr-warmup-steps", type=int, default=0,
                     help="linear LR warm-up steps (default 0)")
  train.add_argument("--min-lr-ratio", type=float, default=0.1,
                     help="final LR of the cosine decay / peak (default 0.1)")
  train.add_argument("--weight-decay", type=float, default=0.1,
                     help="AdamW decoupled weight decay on matrices (default 0.1)")
  train.add_argument("--b1", type=float, default=0.9, help="AdamW β1")
  train.add_argument("--b2", type=float, default=0.95, help="AdamW β2")
  train.add_argument("--clip-norm", type=float, default=1.0,
                     help="global gradient-norm clip (0 = off)")
  train.add_argument("--mesh", default=None,
                     help="e.g. data=2,fsdp=4 (default: all local devices on data)")
  cli.add_data_arguments(p)
  return p


# ----------------------------------------------------------------------------- helpers


def model_overrides(args) -> dict:
  fields = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
            "rotary_dim", "vocab_size", "dense_intermediate_size", "index_head_dim",
            "index_block_size", "index_topk_blocks")
  out = {f: getattr(args, f) for f in fields}
  out["sparse_layers"] = args.sparse_layers
  out["moe_layers"] = args.moe_layers
  return out


def base_config(name: str):
  if name.endswith(".json") or os.path.isdir(name):
    return config_lib.from_hf_config(name)
  return config_lib.preset(name)


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines log. A last line that does not decode (a write torn by a
  kill) is skipped with a warning; an undecodable line before it is an error naming it."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
  records = []
  for n, (number, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if n == len(lines) - 1:
        print(f"warning: {path}: line {number} is incomplete (an interrupted write?); "
              "skipped", file=sys.stderr)
        break
      raise SystemExit(f"{path}: line {number} is not valid JSON ({e}); fix or remove it")
  return records


def truncate_log(path: str, step: int):
  """Drop records after ``step`` (a resumed run rewrites them). The log is rewritten through a
  temporary file and ``os.replace``, so a kill never leaves it half-written."""
  records = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


# Flags that control one invocation, not what is computed.
RUN_CONTROL = {"resume", "stop_at", "time_limit", "quiet", "eval_every", "eval_examples",
               "save_every", "keep", "output_dir", "init_from", "mesh", "profile_step"}


def changed_flags(path: str, now: dict) -> dict:
  """{flag: (before, now)} for flags that differ from the args.json at ``path``."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    before = json.load(f)
  return {k: (before.get(k), v) for k, v in now.items()
          if k not in RUN_CONTROL and before.get(k) != v}


def plot_curves(log_path: str, png_path: str, dense_warmup_steps: int = 0):
  """curves.png: LM loss and total loss, KL, gradient norm, tokens/s (and eval accuracy)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = read_jsonl(log_path)
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval" in r]
  fig, axes = plt.subplots(2, 2, figsize=(11, 7))
  steps = [r["step"] for r in train]
  panels = [(axes[0, 0], [("lm_loss", "LM loss"), ("loss", "total loss")], "loss"),
            (axes[0, 1], [("kl", "Σ KL")], "indexer KL"),
            (axes[1, 0], [("grad_norm", "all"), ("grad_norm_index", "index branch")],
             "gradient norm (before clipping)"),
            (axes[1, 1], [("tokens_per_s", "tokens/s")], "throughput")]
  for ax, series, title in panels:
    for key, label in series:
      # Steps that compiled a step function say nothing about throughput.
      skip = key == "tokens_per_s"
      ax.plot(steps, [math.nan if skip and r.get("includes_compile") else r.get(key, math.nan)
                      for r in train], label=label)
    if dense_warmup_steps:
      ax.axvline(dense_warmup_steps + 0.5, color="gray", ls="--", lw=1, label="dense -> MSA")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
  if train and max(r.get("kl", 0) for r in train) > 0:
    axes[0, 1].set_yscale("log")
  if evals:
    ax2 = axes[0, 0].twinx()
    ax2.plot([r["step"] for r in evals], [r["eval"]["accuracy"] for r in evals], "o-",
             color="tab:green", label="eval accuracy")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("eval accuracy")
    ax2.legend(fontsize=8, loc="center right")
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)


def fmt_record(r: dict, total: int) -> str:
  return (f"step {r['step']}/{total} [{r['attention']}] loss {r['loss']:.4f} lm "
          f"{r['lm_loss']:.4f} kl {r['kl']:.4f} gnorm {r['grad_norm']:.3f} lr {r['lr']:.2e} "
          f"{r['tokens_per_s']:.0f} tok/s")


# ----------------------------------------------------------------------------- main


def main(argv=None, *, on_step=None):
  """Run the CLI. ``on_step(step, record)`` (tests) is called after each logged step."""
  t_begin = time.perf_counter()
  args = build_parser().parse_args(argv)
  if args.steps < 0 or args.batch_size < 1 or args.save_every < 1:
    raise SystemExit("--steps must be >= 0, --batch-size and --save-every >= 1")
  out_dir = os.path.abspath(args.output_dir)
  os.makedirs(out_dir, exist_ok=True)
  ckpt_dir = os.path.join(out_dir, "checkpoints")
  mesh = sharding.make_mesh(sharding.parse_mesh(args.mesh, {"data": jax.device_count()}))

  ckpts = training.Checkpoints(ckpt_dir, keep=args.keep)
  try:
    return _train(args, ckpts, mesh, out_dir, on_step, t_begin)
  finally:
    ckpts.close()


def _train(args, ckpts, mesh, out_dir, on_step, t_begin):
  """Build or restore the run, train to ``--steps`` (or a stop), save, summarise."""
  log_path = os.path.join(out_dir, "metrics.jsonl")
  args.dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  resume_step = ckpts.latest_step()
  if resume_step is not None and not args.resume:
    raise SystemExit(f"{out_dir} already holds checkpoints (step {resume_step}): pass --resume "
                     "to continue, or choose a new --output-dir")
  config, model, tokenizer_dirs = _build_model(args, out_dir, resume=resume_step is not None)
  training.save_json(os.path.join(out_dir, "config.json"), config_lib.to_hf_config(config))
  source = cli.make_source(args, config.vocab_size, tokenizer_dirs)
  train_config, trainer = _build_trainer(args, model, mesh)
  data_settings = {k: getattr(args, k) for k in DATA_KEYS}
  state = _initial_state(args, ckpts, trainer, out_dir, log_path, data_settings,
                         resume=resume_step is not None)
  resumed = resume_step is not None
  trainer.parts.release()  # the state holds the parameters now
  del model
  training.save_json(os.path.join(out_dir, "args.json"), vars(args))

  def meta(step):
    return {"step": step, "examples_seen": step * args.batch_size,
            "data_settings": data_settings, "data": source.describe(),
            "train_config": dataclasses.asdict(train_config)}

  step, state = _loop(args, trainer, train_config, state, source, ckpts, meta, mesh, out_dir,
                      log_path, on_step, t_begin, resumed)
  finished = step >= args.steps
  if finished:
    model = trainer.model(state)
    model_dir = os.path.join(out_dir, "model")
    if os.path.isdir(model_dir):
      shutil.rmtree(model_dir)
    checkpoint_lib.save_orbax(model, model_dir)
  plot_curves(log_path, os.path.join(out_dir, "curves.png"), args.dense_warmup_steps)
  records = [r for r in read_jsonl(log_path) if "loss" in r]
  summary = {"step": step, "finished": finished, "output_dir": out_dir}
  if records:
    summary.update({k: records[-1][k] for k in ("loss", "lm_loss", "kl")})
  print(json.dumps(summary))
  if not finished:
    print(f"stopped at step {step} of {args.steps}: rerun with --resume to continue")
  return 0


def _build_model(args, out_dir, *, resume):
  """(config, model, folders to look for a tokenizer in): the run's own config when resuming,
  else --init-from's weights or --config, with the command line's model overrides."""
  tokenizer_dirs = [out_dir]
  try:
    if resume:  # the run's own config; --init-from is not read again
      config, init_params = config_lib.from_hf_config(out_dir), None
    elif args.init_from:
      config, init_params = training.load_params(args.init_from)
      config = training.override_config(config, **model_overrides(args))
      tokenizer_dirs.append(args.init_from)
    else:
      config = training.override_config(base_config(args.config), **model_overrides(args))
      init_params = None
  except (ValueError, OSError) as e:
    raise SystemExit(f"model: {e}")
  model, report = training.build_model(config, seed=args.seed, dtype=jnp.dtype(args.dtype),
                                       param_dtype=jnp.dtype(args.param_dtype),
                                       implementation=args.implementation,
                                       init_params=init_params)
  if init_params is not None:
    if report["added"]:
      print(f"init-from: {len(report['added'])} parameter(s) freshly initialised (not in the "
            f"checkpoint): {report['added'][:8]}{' ...' if len(report['added']) > 8 else ''}")
    if report["dropped"]:
      print(f"init-from: {len(report['dropped'])} checkpoint parameter(s) unused: "
            f"{report['dropped'][:8]}")
    for folder in tokenizer_dirs[1:]:
      tok = os.path.join(folder, "tokenizer.json")
      if os.path.exists(tok):
        shutil.copy(tok, os.path.join(out_dir, "tokenizer.json"))
  return config, model, tokenizer_dirs


def _build_trainer(args, model, mesh):
  """(TrainConfig, Trainer) from the command line; SystemExit on a bad combination."""
  try:
    train_config = training.TrainConfig(
        total_steps=args.steps, mode=args.mode, attention=args.attention,
        dense_warmup_steps=args.dense_warmup_steps, dense_kl_support=args.dense_kl_support,
        kl_weight=args.kl_weight, learning_rate=args.lr, lr_warmup_steps=args.lr_warmup_steps,
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, b1=args.b1,
        b2=args.b2, clip_norm=args.clip_norm, remat=args.remat,
        dense_implementation=args.dense_implementation)
    trainer = training.Trainer(model, train_config, mesh)
  except ValueError as e:
    raise SystemExit(str(e))
  shards = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
  if args.batch_size % shards:
    raise SystemExit(f"--batch-size {args.batch_size} must be divisible by data x fsdp = "
                     f"{shards}")
  return train_config, trainer


def _initial_state(args, ckpts, trainer, out_dir, log_path, data_settings, *, resume):
  """The newest intact checkpoint's state when resuming (refusing other data settings, the
  log cut back to it), else a fresh state and log."""
  if not resume:
    if os.path.exists(log_path):
      os.remove(log_path)
    return trainer.init_state()
  try:
    resume_step, state, meta, broken = ckpts.restore_newest_intact(trainer.abstract_state())
  except RuntimeError as e:
    raise SystemExit(f"--resume: {e}")
  for step, aside, err in broken:
    print(f"warning: checkpoint step {step} cannot be restored ({err}); moved to {aside}, "
          f"resuming from step {resume_step}", file=sys.stderr)
  # runs from before --repeats / --fused-pairs
  saved = {"repeats": 1, "fused_pairs": False, **meta.get("data_settings", {})}
  if saved != data_settings:
    raise SystemExit(f"--resume: the data settings differ from the checkpoint's "
                     f"({saved} vs {data_settings}); resuming would not continue the "
                     "same run")
  truncate_log(log_path, resume_step)
  print(f"resumed from step {resume_step} ({meta['examples_seen']} examples seen)")
  changed = changed_flags(os.path.join(out_dir, "args.json"), vars(args))
  if changed:
    print(f"note: flags differ from the previous invocation (the model config is the run's "
          f"own; a changed schedule or optimizer flag changes the run): {changed}")
  return state


def _loop(args, trainer, train_config, state, source, ckpts, meta, mesh, out_dir, log_path,
          on_step, t_begin, resumed):
  """The training steps from the state's step to --steps / --stop-at / --time-limit, with
  logging, checkpoints and evaluations; returns (last step, state)."""
  start = int(state["step"])
  tokens_per_step = args.batch_size * source.seq_len
  stop = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
  step, last_saved, step_times = start, start if resumed else None, []
  compiled = set()  # phases whose step function this process has compiled
  progress, say = None, print
  if not args.quiet:
    from tqdm import tqdm
    progress = tqdm(total=args.steps, initial=start, desc="train", unit="step",
                    dynamic_ncols=True)
    say = progress.write  # lines above the progress bar
  # The next batch is built on a host thread while the device runs the current step (batches
  # are a pure function of the step, so this changes nothing but the wall time).
  loader = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  fetch = lambda s: loader.submit(source.batch, s * args.batch_size, args.batch_size, "train")
  pending = fetch(step) if step < stop else None
  try:
    with open(log_path, "a") as log:
      while step < stop:
        attention, indexer_loss = train_config.phase(step)
        t0 = time.perf_counter()
        batch = pending.result()
        pending = fetch(step + 1) if step + 1 < stop else None
        with _profiler(args, step + 1, out_dir, say):
          state, met = trainer.step(state, batch, step)
          met = jax.device_get(met)
        dt = time.perf_counter() - t0
        step += 1
        first = (attention, indexer_loss) not in compiled
        compiled.add((attention, indexer_loss))
        if not first:
          step_times.append(dt)
        record = {"step": step, "attention": attention, "indexer_loss": indexer_loss,
                  **{k: float(v) for k, v in met.items() if np.ndim(v) == 0},
                  "kl_per_layer": [float(x) for x in met["kl_per_layer"]],
                  "tokens_per_s": tokens_per_step / dt, "step_s": dt,
                  "includes_compile": first}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if progress is not None:
          progress.update(1)
          progress.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.3f}")
          progress.write(fmt_record(record, args.steps))
        if on_step is not None:
          on_step(step, record)
        if step % args.save_every == 0:
          ckpts.save(step, state, meta(step))
          last_saved = step
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
          _evaluate(args, trainer, state, source, mesh, step, attention, log_path, say)
        if args.time_limit is not None:
          elapsed = time.perf_counter() - t_begin
          typical = float(np.median(step_times[-20:])) if step_times else 0.0
          if elapsed + 2 * typical > args.time_limit * 60:  # margin: a step and the save
            say(f"time limit: stopping after step {step}")
            break
    if last_saved != step:
      ckpts.save(step, state, meta(step))
    ckpts.wait()
  finally:
    loader.shutdown(cancel_futures=True)
    if progress is not None:
      progress.close()
  return step, state


def _evaluate(args, trainer, state, source, mesh, step, attention, log_path, say):
  """Evaluate the current parameters, append the result to the log and print it."""
  result = metrics.evaluate(trainer.parts, state["params"], source,
                            num_examples=args.eval_examples, batch_size=args.batch_size,
                            attention=attention, mesh=mesh,
                            dense_implementation=args.dense_implementation)
  record = {"step": step, "eval": result, "attention": attention}
  with open(log_path, "a") as f:
    f.write(json.dumps(record) + "\n")
  if not args.quiet:
    extra = (f" block_recall {result['block_recall']:.3f} score_recall "
             f"{result['score_recall']:.3f}" if result.get("block_recall") is not None
             else "")
    say(f"eval @ {step} [{attention}]: accuracy {result['accuracy']:.4f} loss "
        f"{result['loss']:.4f} ppl {result['perplexity']:.3f}{extra}")


@contextlib.contextmanager
def _profiler(args, n, out_dir, say):
  """--profile-step: trace step n, then print the device time per kernel."""
  if n != args.profile_step:
    yield
    return
  trace_dir = os.path.join(out_dir, "profile")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    yield
  table = profiling.markdown(f"training step {n}", profiling.kernel_table(trace_dir, 1))
  with open(os.path.join(trace_dir, "profile_step.md"), "w") as f:
    f.write(table + "\n")
  say(table)


run = cli.console_command(main, compilation_cache=True)


if __name__ == "__main__":
  run()
