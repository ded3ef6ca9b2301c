"""Decode step time vs the index kernel's ``min_programs`` (key tiles spread over the GPU).

``index_topk.spread_blocks_per_tile`` halves the key tile until the grid has ``min_programs``
programs. This times an M3-shaped MSA decode step (one query per sequence, random inputs) in
a jitted loop per (batch, context) for several thresholds, in one process. Needs a GPU::

    PYTHONPATH=$PWD python3 benchmarks/probes/index_decode_spread.py
"""

import argparse
import sys

import jax
import jax.numpy as jnp

import msa_jax
from models.cli import benchmark as bench
from msa_jax import tuning


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 131072, 1048576])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--thresholds", type=int, nargs="+", default=[0, 132, 264])
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv)
  w = bench.M3
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| batch | context | " + " | ".join(f"min_programs {m} ms" for m in args.thresholds)
        + " |")
  print("|---|---|" + "---|" * len(args.thresholds))
  for batch in args.batches:
    for ctx in args.contexts:
      keys = jax.random.split(jax.random.PRNGKey(ctx + batch), 5)
      rnd = lambda key, shape: jax.random.normal(key, shape, jnp.bfloat16)
      inputs = (rnd(keys[0], (batch, 1, w.q_heads, w.head_dim)),
                rnd(keys[1], (batch, ctx, w.groups, w.head_dim)),
                rnd(keys[2], (batch, ctx, w.groups, w.head_dim)),
                rnd(keys[3], (batch, 1, w.groups, w.index_dim)),
                rnd(keys[4], (batch, ctx, w.index_dim)))
      times = []
      for m in args.thresholds:
        with tuning.override("index_decode", min_programs=m):
          loop = bench.in_loop(lambda *a: msa_jax.msa_attention(
              *a, block_size=w.block_size, topk=w.topk), args.steps)
          jax.block_until_ready(loop(*inputs))  # traced and compiled under the override
        ms, _ = bench.timed(lambda: jax.block_until_ready(loop(*inputs)), iters=20, budget_s=3)
        times.append(ms / args.steps)
      print(f"| {batch} | {ctx} | " + " | ".join(f"{t:.4f}" for t in times) + " |", flush=True)


if __name__ == "__main__":
  sys.exit(main())
