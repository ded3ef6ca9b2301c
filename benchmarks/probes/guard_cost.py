"""What the Mosaic GPU prefill's value guard costs: ``sparse_attention`` with and without it.

``ops/sparse_attention/paths.py`` cleans V in one XLA pass before the Mosaic GPU kernel
(``sparse_attention_mgpu.guard_values``) and sets to NaN the queries that see a non-finite
value after it (``poison``). This times ``msa_jax.sparse_attention`` on one prefill chunk
(the last ``--chunk`` queries of a ``--context``-token prompt, M3 shapes, bf16) as the API
runs it and with both functions replaced by identities, in one process. Needs a GPU::

    PYTHONPATH=$PWD python3 benchmarks/probes/guard_cost.py --context 131072 --chunk 65536
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import msa_jax
from models.cli import benchmark as bench
from msa_jax.ops.sparse_attention import gpu_mosaic as mgpu

HQ, G, D, BK, TOPK = 64, 4, 128, 128, 16


def timed(fn, iters):
  """Median ms of ``fn()`` after a warm-up call (the benchmark's timer)."""
  return bench.timed(lambda: jax.block_until_ready(fn()), iters=iters, budget_s=60)[0]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--context", type=int, nargs="+", default=[131072])
  parser.add_argument("--chunk", type=int, default=65536)
  parser.add_argument("--iters", type=int, default=20)
  args = parser.parse_args(argv)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| context | chunk | guarded ms | unguarded ms | guard cost |")
  print("|---|---|---|---|---|")
  for n in args.context:
    c = min(args.chunk, n)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    rnd = lambda key, shape: jax.random.normal(key, shape, jnp.bfloat16)
    q = rnd(keys[0], (1, c, HQ, D))
    k, v = rnd(keys[1], (1, n, G, D)), rnd(keys[2], (1, n, G, D))
    pos = (n - c + jnp.arange(c, dtype=jnp.int32))[None]
    kvl = jnp.array([n], jnp.int32)
    ids = jax.random.randint(keys[3], (1, c, G, TOPK), 0, n // BK)
    ids = jnp.minimum(ids, pos[..., None, None] // BK)  # causal blocks only

    def run():
      return jax.jit(lambda q, k, v, ids: msa_jax.sparse_attention(
          q, k, v, ids, q_positions=pos, kv_lengths=kvl, implementation="pallas_gpu"))

    guarded = timed(lambda f=run(): f(q, k, v, ids), args.iters)
    saved = mgpu.guard_values, mgpu.poison
    mgpu.guard_values = lambda v, kv_lengths: (v, None)
    mgpu.poison = lambda out, *a: out
    try:
      bare = timed(lambda f=run(): f(q, k, v, ids), args.iters)
    finally:
      mgpu.guard_values, mgpu.poison = saved
    print(f"| {n} | {c} | {guarded:.2f} | {bare:.2f} | {100 * (guarded / bare - 1):+.1f}% |")


if __name__ == "__main__":
  main()
