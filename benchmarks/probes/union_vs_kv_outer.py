"""The union-tile forward against the KV-outer path, on random, structured and mixed selections.

Times, on the last ``--chunk`` queries of a ``--context``-token prefill (M3 shapes, bf16),
``msa_jax.sparse_attention`` as the API runs it three ways (KV-outer alone: schedule, kernel,
combine; the table's per-call choice by the mean union; the per-tile mix, ``union_mix``),
the Mosaic union kernel alone, and ``ops/sparse_attention/gpu_triton_union.sparse_attention``
(tile unions in XLA, then one query-outer Triton kernel) for several tile sizes and warp
counts, after checking each against the KV-outer output. Selections come from the index
kernel on random, structured or mixed index inputs (``models.cli.benchmark.index_inputs``).
Needs a GPU::

    PYTHONPATH=$PWD python3 benchmarks/probes/union_vs_kv_outer.py
"""

import argparse
import itertools
import math
import sys

import jax
import jax.numpy as jnp

import msa_jax
from models.cli import benchmark as bench
from msa_jax import reference, workloads
from msa_jax.ops.sparse_attention import gpu_mosaic as mgpu
from msa_jax.ops.sparse_attention import gpu_triton_union as union_kernel
from msa_jax.ops.sparse_attention import gpu_mosaic_union as union_mgpu
from msa_jax import tuning


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--context", type=int, default=131072)
  parser.add_argument("--chunk", type=int, default=16384)
  parser.add_argument("--tiles", type=int, nargs="+", default=[4, 8, 16])
  parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
  parser.add_argument("--stages", type=int, nargs="+", default=[2])
  parser.add_argument("--mosaic-stages", type=int, nargs="+", default=[2, 3],
                      help="K/V ring depths of the Mosaic GPU union kernel")
  parser.add_argument("--skip-triton", action="store_true",
                      help="time only the Mosaic GPU union kernel against the API")
  args = parser.parse_args(argv)
  w, n, c = bench.M3, args.context, args.chunk
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, context {n}, last {c} queries")
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  rnd = lambda key, shape: jax.random.normal(key, shape, jnp.bfloat16)
  q = rnd(keys[0], (1, c, w.q_heads, w.head_dim))
  k, v = rnd(keys[1], (1, n, w.groups, w.head_dim)), rnd(keys[2], (1, n, w.groups, w.head_dim))
  pos = (n - c + jnp.arange(c, dtype=jnp.int32))[None]
  kvl = jnp.array([n], jnp.int32)
  nb = n // w.block_size
  scale = 1 / math.sqrt(w.head_dim)
  print("| selection | union of 8 | path | ms | rel. err vs KV-outer |")
  print("|---|---|---|---|---|")
  for selection in bench.SELECTIONS:
    q_idx, k_idx = bench.index_inputs(selection, keys[3], 1, n, c, w)
    ids = msa_jax.index_topk(q_idx, k_idx, block_size=w.block_size, topk=w.topk,
                             q_positions=pos, kv_lengths=kvl)
    union8 = float(workloads.union_size(ids, nb, 8))
    api = lambda q, k, v, ids: msa_jax.sparse_attention(q, k, v, ids, q_positions=pos,
                                                         kv_lengths=kvl)
    want = None
    for label, cfg in [("API, KV-outer", dict(union_max=0)),
                       ("API, per call", dict(union_mix=False)),
                       ("API, per tile", dict(union_mix=True))]:
      with tuning.override("sparse", **cfg):
        fn = jax.jit(lambda *a: api(*a))  # a fresh trace: overrides are read when tracing
        got = fn(q, k, v, ids).astype(jnp.float32)
        want = got if want is None else want
        err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        ms, _ = bench.timed(lambda: jax.block_until_ready(fn(q, k, v, ids)), iters=20,
                            budget_s=3)
      print(f"| {selection} | {union8:.1f} | {label} | {ms:.2f} | {err:.1e} |", flush=True)
    for stages in args.mosaic_stages:
      def mosaic(q, k, v, ids, stages=stages):
        vg, _ = mgpu.guard_values(v, kvl)
        return union_mgpu.sparse_attention(q, k, vg, ids, reference.valid_block_mask(ids, nb),
                                           pos, kvl, block_size=w.block_size, scale=scale,
                                           num_stages=stages)[0]
      fn = jax.jit(mosaic)
      label = f"Mosaic union, {union_mgpu.queries_per_tile(w.q_heads // w.groups)} queries, {stages} stages"
      try:
        got = fn(q, k, v, ids).astype(jnp.float32)
        err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        ms, _ = bench.timed(lambda: jax.block_until_ready(fn(q, k, v, ids)), iters=20,
                            budget_s=3)
        print(f"| {selection} | {union8:.1f} | {label} | {ms:.2f} | {err:.1e} |", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"| {selection} | {union8:.1f} | {label} | failed: {type(e).__name__}: "
              f"{str(e)[:300]} | |", flush=True)
    for tile in ([] if args.skip_triton else args.tiles):
      unions = jax.jit(lambda ids, tile=tile: union_kernel.tile_unions(
          ids, reference.valid_block_mask(ids, nb), tile))
      ms, _ = bench.timed(lambda: jax.block_until_ready(unions(ids)), iters=20, budget_s=2)
      print(f"| {selection} | {union8:.1f} | tile unions alone (XLA), {tile} queries | "
            f"{ms:.2f} | - |", flush=True)
      for warps, stages in itertools.product(args.warps, args.stages):
        fn = jax.jit(lambda q, k, v, ids, tile=tile, warps=warps, stages=stages:
                     union_kernel.sparse_attention(
                         q, k, v, ids, reference.valid_block_mask(ids, nb), pos, kvl,
                         block_size=w.block_size, scale=scale, queries_per_tile=tile,
                         num_warps=warps, num_stages=stages)[0])
        try:
          got = fn(q, k, v, ids).astype(jnp.float32)
          err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
          ms, _ = bench.timed(lambda: jax.block_until_ready(fn(q, k, v, ids)), iters=20,
                              budget_s=3)
          print(f"| {selection} | {union8:.1f} | union, {tile} queries, {warps} warps, {stages} stages | "
                f"{ms:.2f} | {err:.1e} |", flush=True)
        except Exception as e:  # pylint: disable=broad-except
          print(f"| {selection} | {union8:.1f} | union, {tile} queries, {warps} warps, {stages} stages | "
                f"failed: {type(e).__name__}: {str(e)[:120]} | |", flush=True)


if __name__ == "__main__":
  sys.exit(main())
