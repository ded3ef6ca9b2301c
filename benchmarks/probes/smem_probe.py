"""Shared memory each Triton kernel asks for, per dtype, head dim and launch parameters.

Lowers (does not run) every Pallas/Triton kernel of ``msa_jax`` and the MoE's few-row kernel
over dtypes x head dims, with the launch parameters the code picks, and sweeps the backward's
tile rows, warps and stages; ``msa_jax.kernels.gpu.smem.recorded`` reads the bytes Triton
computed. One JSON line per kernel launch, then a table of the largest per kernel and dtype
against the card's limit. Needs a GPU.

    PYTHONPATH=$PWD python3 benchmarks/probes/smem_probe.py --out /tmp/smem.jsonl
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))

import msa_jax  # noqa: E402
from msa_jax.kernels.gpu import smem  # noqa: E402
from msa_jax.kernels.gpu import sparse_attention_bwd as bwd  # noqa: E402
from msa_jax.kernels.gpu import tuning  # noqa: E402
from models import grouped_matmul as gm  # noqa: E402

DTYPES = ("bfloat16", "float16", "float32")
HEAD_DIMS = (64, 128, 256)
BK = 128


def lowered(fn, *args):
  """Launches recorded while lowering ``fn(*args)``; an exception's text instead of failing."""
  with smem.recorded() as launches:
    try:
      jax.jit(fn).lower(*args)
    except Exception as e:  # pylint: disable=broad-except
      return launches, f"{type(e).__name__}: {str(e)[:300]}"
  return launches, None


def qkv(dtype, d, t=256, s=1024, hq=16, g=1):
  key = jax.random.PRNGKey(0)
  q = jax.ShapeDtypeStruct((1, t, hq, d), dtype)
  k = jax.ShapeDtypeStruct((1, s, g, d), dtype)
  ids = jax.random.randint(key, (1, t, g, 16), 0, s // BK)
  return q, k, ids


def cases(args):
  """(label, fields, fn, abstract args) of every lowering to record."""
  for dtype, d, heads in itertools.product(DTYPES, HEAD_DIMS, (16, 8)):
    dt = jnp.dtype(dtype)
    for t in (256, 1):
      q, k, ids = qkv(dt, d, t=t, hq=heads)
      fields = dict(dtype=dtype, d=d, heads=heads, t=t)

      def fwd(q, k, v, ids=ids):  # the Triton kernel, also where the card's table picks Mosaic
        with tuning.override("sparse", kernel="triton"):
          return msa_jax.sparse_attention(q, k, v, ids, implementation="pallas_gpu")
      yield "forward", fields, fwd, (q, k, k)
      if t > 1:
        loss = lambda q, k, v, ids=ids: jnp.sum(msa_jax.sparse_attention(
            q, k, v, ids, implementation="pallas_gpu").astype(jnp.float32))
        yield "grad", fields, jax.grad(loss, argnums=(0, 1, 2)), (q, k, k)
  for dtype, di in itertools.product(DTYPES, (64, 128)):
    dt = jnp.dtype(dtype)
    for t in (256, 1):
      qi = jax.ShapeDtypeStruct((1, t, 1, di), dt)
      ki = jax.ShapeDtypeStruct((1, 4096, di), dt)
      for selection in ("scores", "tile", "fused"):
        if t == 1 and selection == "fused":
          continue
        section = "index_decode" if t == 1 else "index"

        def index(qi, ki, selection=selection, section=section):
          with tuning.override(section, selection=selection):
            return msa_jax.index_topk(qi, ki, implementation="pallas_gpu")
        yield "index", dict(dtype=dtype, d=di, t=t, selection=selection), index, (qi, ki)
  # The backward's launch parameters, swept (lowering the backward kernels alone).
  for dtype, d in itertools.product(DTYPES, HEAD_DIMS):
    dt = jnp.dtype(dtype)
    q, k, ids = qkv(dt, d)
    out = jax.ShapeDtypeStruct(q.shape, dt)
    lse = jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)
    pos = jnp.arange(256, dtype=jnp.int32)[None] + 768
    lens = jnp.array([1024], jnp.int32)
    for rows, warps, stages in itertools.product((128, 64, 32, 16), (4, 8), (1, 2)):
      fn = lambda q, k, v, out, lse, do, rows=rows, warps=warps, stages=stages: (
          bwd.sparse_attention_bwd(q, k, v, ids, pos, lens, out, lse, do, block_size=BK,
                                   scale=0.1, queries_per_item=max(1, rows // 16),
                                   num_warps=warps, num_stages=stages))
      yield "bwd_sweep", dict(dtype=dtype, d=d, heads=16, tile_rows=rows, warps=warps,
                              stages=stages), fn, (q, k, k, out, lse, out)
  for dtype in DTYPES:
    dt = jnp.dtype(dtype)
    for (e, h, f), p in itertools.product(((128, 6144, 3072), (16, 2048, 1024)), (4, 32)):
      x = jax.ShapeDtypeStruct((p, h), dt)
      w = jax.ShapeDtypeStruct((e, h, f), dt)
      sizes = jnp.zeros((e,), jnp.int32).at[0].set(p)
      fn = lambda x, w, sizes=sizes: gm.grouped_matmul(x, w, sizes, implementation="pallas_gpu")
      yield "moe", dict(dtype=dtype, experts=e, hidden=h, width=f, rows=p), fn, (x, w)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="smem.jsonl")
  parser.add_argument("--budget-s", type=float, default=400, help="stop after this long")
  args = parser.parse_args()
  limit = smem.limit()
  start = time.time()
  worst = collections.defaultdict(int)
  with open(args.out, "w") as f:
    for label, fields, fn, fn_args in cases(args):
      if time.time() - start > args.budget_s:
        print(f"budget reached at {label} {fields}")
        break
      launches, error = lowered(fn, *fn_args)
      for launch in launches:
        row = dict(case=label, **fields, kernel=launch.name, num_warps=launch.num_warps,
                   num_stages=launch.num_stages, smem=launch.smem_bytes,
                   fits=launch.smem_bytes <= limit)
        f.write(json.dumps(row) + "\n")
        if label != "bwd_sweep":
          key = (launch.name, fields["dtype"])
          worst[key] = max(worst[key], launch.smem_bytes)
      if error:
        f.write(json.dumps(dict(case=label, **fields, error=error)) + "\n")
        print(f"{label} {fields}: {error[:160]}")
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, limit {limit} bytes, "
        f"{time.time() - start:.0f} s")
  for (name, dtype), n in sorted(worst.items()):
    print(f"{name:40s} {dtype:9s} {n:7d} {'ok' if n <= limit else 'OVER'}")


if __name__ == "__main__":
  main()
