"""Where a decode step's time goes: a per-kernel table of the Generator's decode block.

Builds a model of ``--config`` with random weights on the GPU, fills its cache to
``--context`` tokens per row, compiles the decode block (``models.serving.Generator``, what
``generate.py`` runs), then traces ``--blocks`` blocks with ``jax.profiler`` and sums the
device time of every kernel by name (from the Perfetto trace). Prints, per kernel name, the
total time per decode step, the launches per step and its share, largest first; also the
step's wall time and the sum of its kernels' device times, whose difference is what the
device spends waiting (launch gaps, host round trips).

    PYTHONPATH=$PWD python3 benchmarks/probes/decode_profile.py --config m3_slice \\
        --batch 8 --context 8192 --out /tmp/profile
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))

from models import checkpoint  # noqa: E402
from models import serving  # noqa: E402


def kernel_table(trace_dir: str) -> list[tuple[str, float, int]]:
  """(name, total microseconds, count) of device events in the newest Perfetto trace."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
                 + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no trace under {trace_dir}")
  with gzip.open(files[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  # Device rows are the processes whose name mentions the GPU ("/device:GPU:0 ...").
  devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
  totals = collections.defaultdict(lambda: [0.0, 0])
  for e in events:  # on a CPU (no device rows) every complete event counts
    if e.get("ph") == "X" and (e.get("pid") in devices or not devices) and "dur" in e:
      t = totals[e["name"]]
      t[0] += float(e["dur"])
      t[1] += 1
  return sorted(((k, v[0], v[1]) for k, v in totals.items()), key=lambda x: -x[1])


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="gen_1b")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--context", type=int, default=8192)
  parser.add_argument("--block", type=int, default=16, help="decode steps per call")
  parser.add_argument("--blocks", type=int, default=3, help="traced blocks")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--out", default="decode_profile")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  model = checkpoint.random_init(args.config, dtype=jnp.bfloat16, implementation=None)
  gen = serving.Generator(model, batch=args.batch,
                          max_len=args.context + args.block * (args.blocks + 2),
                          prefill_chunk=16, decode_block=args.block)
  cache = gen.init_cache()
  key = jax.random.PRNGKey(0)
  fill = lambda x, i: None if x is None else jax.random.normal(jax.random.fold_in(key, i),
                                                              x.shape, x.dtype)
  cache = cache._replace(k=tuple(fill(x, i) for i, x in enumerate(cache.k)),
                         v=tuple(fill(x, 50 + i) for i, x in enumerate(cache.v)),
                         index_k=tuple(fill(x, 90 + i) for i, x in enumerate(cache.index_k)),
                         lengths=jnp.full((args.batch,), args.context, jnp.int32))
  logits = jax.random.normal(key, (args.batch, model.config.vocab_size))
  _, cache = gen.decode(logits, cache, max_new_tokens=args.block)  # compile + warm
  steps = args.block * args.blocks
  t0 = time.perf_counter()
  with jax.profiler.trace(args.out, create_perfetto_trace=True):
    _, cache = gen.decode(logits, cache, max_new_tokens=steps)
  wall = (time.perf_counter() - t0) / steps * 1e3
  gen.timings = serving.Timings()
  _, cache = gen.decode(logits, cache, max_new_tokens=steps)
  untraced = gen.timings.decode_s / steps * 1e3
  table = kernel_table(args.out)
  device = sum(t for _, t, _ in table) / steps / 1e3
  rows = [{"kernel": name, "ms_per_step": t / steps / 1e3, "launches_per_step": n / steps,
           "share": t / max(sum(x for _, x, _ in table), 1e-9)} for name, t, n in table]
  report = {"config": args.config, "batch": args.batch, "context": args.context,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "step_ms_untraced": untraced, "step_ms_traced": wall,
            "kernel_ms_per_step": device,
            "launches_per_step": sum(n for _, _, n in table) / steps, "kernels": rows}
  with open(os.path.join(args.out, "decode_profile.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(f"{args.config} batch {args.batch} context {args.context}: step {untraced:.3f} ms "
        f"(traced {wall:.3f}), kernels {device:.3f} ms in {report['launches_per_step']:.0f} "
        f"launches per step")
  for r in rows[:args.top]:
    print(f"{r['ms_per_step']:8.4f} ms {r['launches_per_step']:6.1f}x {r['share'] * 100:5.1f}%  "
          f"{r['kernel'][:110]}")


if __name__ == "__main__":
  main()
