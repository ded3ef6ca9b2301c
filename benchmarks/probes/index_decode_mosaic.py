"""Decode selection: the Mosaic GPU index kernel split over key ranges against the Triton one.

For each (batch, context) with one query per sequence (M3 index shapes, bf16, random index
inputs), times ``msa_jax.index_topk`` per call and per step inside a jitted loop (as a
served model runs it), with this card's table (Triton ``"tile"``) and with
``selection="mosaic"`` at several CTA counts (``min_programs``: the key ranges per row
tile), after checking the Mosaic selection against the table's (recall of its blocks). The
index keys' bytes over the loop time give the read rate beside a read-only stream over the
same bytes, measured in the same process. Needs a GPU::

    PYTHONPATH=$PWD python3 benchmarks/probes/index_decode_mosaic.py --out results.json
"""

import argparse
import json

import jax
import jax.numpy as jnp

import msa_jax
from msa_jax import workloads
from models.cli import benchmark as bench
from msa_jax import tuning


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--contexts", type=int, nargs="+", default=[131072, 1048576])
  parser.add_argument("--programs", type=int, nargs="+", default=[132, 264, 528])
  parser.add_argument("--stages", type=int, nargs="+", default=[4, 6])
  parser.add_argument("--loop-steps", type=int, default=20)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  w = bench.M3
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  rows = []
  for b in args.batches:
    for n in args.contexts:
      q_idx, k_idx = bench.index_inputs("random", jax.random.PRNGKey(n + b), b, n, 1, w)
      key_bytes = k_idx.size * k_idx.dtype.itemsize
      stream = jax.jit(lambda k: jnp.max(k, axis=(1, 2)))  # a read-only pass over the keys
      stream_ms, _ = bench.timed(lambda: jax.block_until_ready(stream(k_idx)), iters=20,
                                 budget_s=2)
      select = lambda qi, ki: msa_jax.index_topk(qi, ki, block_size=w.block_size, topk=w.topk)
      want = jax.jit(select)(q_idx, k_idx)
      variants = [("table", {})]
      variants += [(f"mosaic, {p} CTAs, {s} stages",
                    dict(selection="mosaic", min_programs=p, mosaic_stages=s))
                   for p in args.programs for s in args.stages]
      for name, cfg in variants:
        with tuning.override("index_decode", **cfg), tuning.override("index", **(
            {"mosaic_stages": cfg.mosaic_stages} if cfg else {})):
          call = jax.jit(lambda *a: select(*a))  # a fresh trace under the override
          loop = bench.in_loop(select, args.loop_steps)
          try:
            got = call(q_idx, k_idx)
            ms, _ = bench.timed(lambda: jax.block_until_ready(call(q_idx, k_idx)), iters=20,
                                budget_s=2)
            loop_ms, _ = bench.timed(lambda: jax.block_until_ready(loop(q_idx, k_idx)),
                                     iters=10, budget_s=2)
          except Exception as e:  # a variant that does not compile: report, go on
            print(f"{b} {n} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        step = loop_ms / args.loop_steps
        row = dict(batch=b, context=n, variant=name, call_ms=ms, loop_ms=step,
                   tbps=key_bytes / (step * 1e-3) / 1e12,
                   stream_tbps=key_bytes / (stream_ms * 1e-3) / 1e12,
                   recall=workloads.selection_recall(got, want))
        rows.append(row)
        print(f"| {b} | {n} | {name} | {ms:.3f} | {step:.4f} | {row['tbps']:.2f} | "
              f"{row['stream_tbps']:.2f} | {row['recall']:.4f} |", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                 "rows": rows}, f, indent=1)
  print("\n| batch | context | variant | per call ms | per step in a loop ms | key TB/s | "
        "read stream TB/s | recall |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['context']} | {r['variant']} | {r['call_ms']:.3f} | "
          f"{r['loop_ms']:.4f} | {r['tbps']:.2f} | {r['stream_tbps']:.2f} | "
          f"{r['recall']:.4f} |")


if __name__ == "__main__":
  main()
