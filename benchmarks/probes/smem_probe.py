"""Which Triton kernels compile within the card's shared memory, per dtype, head dim and tiles.

Compiles (does not run) the Pallas/Triton kernels of ``msa_jax`` and the MoE's few-row kernel
over dtypes x head dims with the launch parameters the code picks, and sweeps the backward's
tile rows and warps. XLA loads a Triton kernel at compile time and fails with ``Shared memory
size limit exceeded: requested N, available: M`` when its tiles do not fit; jax 0.11.2 gives
no other way to read a kernel's shared memory from Python. One JSON line per compile (ok, and
the bytes requested when it failed). Needs a GPU.

    PYTHONPATH=$PWD python3 benchmarks/probes/smem_probe.py --out /tmp/smem.jsonl
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))

import msa_jax  # noqa: E402
from msa_jax.ops.sparse_attention import gpu_triton_bwd as bwd  # noqa: E402
from msa_jax import tuning  # noqa: E402
from models import grouped_matmul as gm  # noqa: E402

DTYPES = ("bfloat16", "float16", "float32")
HEAD_DIMS = (64, 128, 256)
BK = 128


def compiled(fn, *args):
  """None if ``fn(*args)`` compiles, else (shared-memory bytes requested or None, message)."""
  try:
    jax.jit(fn).lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    m = re.search(r"requested (\d+), available: (\d+)", text)
    return (int(m.group(1)) if m else None), text[:300]
  return None


def qkv(dtype, d, t=256, s=1024, hq=16, g=1):
  key = jax.random.PRNGKey(0)
  q = jax.ShapeDtypeStruct((1, t, hq, d), dtype)
  k = jax.ShapeDtypeStruct((1, s, g, d), dtype)
  ids = jax.random.randint(key, (1, t, g, 16), 0, s // BK)
  return q, k, ids


def cases():
  """(label, fields, fn, abstract args) of every compile to try, most important first."""
  for dtype, d in itertools.product(DTYPES, HEAD_DIMS):  # forward + backward, as the code picks
    q, k, ids = qkv(jnp.dtype(dtype), d)
    loss = lambda q, k, v, ids=ids: jnp.sum(msa_jax.sparse_attention(
        q, k, v, ids, implementation="pallas_gpu").astype(jnp.float32))
    yield "grad", dict(dtype=dtype, d=d, heads=16), jax.grad(loss, argnums=(0, 1, 2)), (q, k, k)
  for dtype, d in itertools.product(("float32", "bfloat16"), HEAD_DIMS):  # backward's tiles
    dt = jnp.dtype(dtype)
    q, k, ids = qkv(dt, d)
    out = jax.ShapeDtypeStruct(q.shape, dt)
    lse = jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)
    pos = jnp.arange(256, dtype=jnp.int32)[None] + 768
    lens = jnp.array([1024], jnp.int32)
    for rows, warps in itertools.product((128, 64, 32, 16), (4, 8)):
      fn = lambda q, k, v, out, lse, do, rows=rows, warps=warps: (
          bwd.sparse_attention_bwd(q, k, v, ids, pos, lens, out, lse, do, block_size=BK,
                                   scale=0.1, queries_per_item=max(1, rows // 16),
                                   num_warps=warps))
      yield "bwd", dict(dtype=dtype, d=d, heads=16, tile_rows=rows, warps=warps), fn, (
          q, k, k, out, lse, out)
  for dtype, d, heads, stages, warps in itertools.product(  # the backward's dQ kernel alone
      DTYPES, HEAD_DIMS, (16, 64), (1, 2), (2, 4)):
    dt = jnp.dtype(dtype)
    q, k, ids = qkv(dt, d, hq=heads)
    rows = jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)
    pos = jnp.arange(256, dtype=jnp.int32)[None] + 768
    lens = jnp.array([1024], jnp.int32)
    cfg = dict(dq_num_warps=warps, dq_num_stages=stages)
    fn = lambda q, k, v, do, lse, delta, cfg=cfg, ids=ids: bwd._dq(
        q, k, v, do, lse, delta, ids, ids >= 0, pos, lens, block_size=BK, scale=0.1, cfg=cfg,
        interpret=False)
    yield "dq", dict(dtype=dtype, d=d, heads=heads, stages=stages, warps=warps), fn, (
        q, k, k, q, rows, rows)
  for dtype, d, t in itertools.product(DTYPES, HEAD_DIMS, (256, 1)):  # Triton forward, decode
    q, k, ids = qkv(jnp.dtype(dtype), d, t=t)

    def fwd(q, k, v, ids=ids):
      with tuning.override("sparse", kernel="triton"):
        return msa_jax.sparse_attention(q, k, v, ids, implementation="pallas_gpu")
    yield "forward", dict(dtype=dtype, d=d, heads=16, t=t), fwd, (q, k, k)
  for dtype, di, t in itertools.product(DTYPES, (64, 128), (256, 1)):  # index kernels
    qi = jax.ShapeDtypeStruct((1, t, 4, di), jnp.dtype(dtype))
    ki = jax.ShapeDtypeStruct((1, 4096, di), jnp.dtype(dtype))
    for selection in ("scores", "tile") + (("fused",) if t > 1 else ()):
      section = msa_jax.MAX_DECODE_QUERIES >= t and "index_decode" or "index"

      def index(qi, ki, selection=selection, section=section):
        with tuning.override(section, selection=selection):
          return msa_jax.index_topk(qi, ki, implementation="pallas_gpu")
      yield "index", dict(dtype=dtype, d=di, t=t, selection=selection), index, (qi, ki)
  for dtype in DTYPES:  # the MoE's few-row kernel
    dt = jnp.dtype(dtype)
    for e, h, f in ((128, 6144, 3072), (16, 2048, 1024)):
      x = jax.ShapeDtypeStruct((32, h), dt)
      w = jax.ShapeDtypeStruct((e, h, f), dt)
      sizes = jnp.zeros((e,), jnp.int32).at[0].set(32)
      fn = lambda x, w, sizes=sizes: gm.grouped_matmul(x, w, sizes, implementation="pallas_gpu")
      yield "moe", dict(dtype=dtype, experts=e, hidden=h, width=f), fn, (x, w)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="smem.jsonl")
  parser.add_argument("--budget-s", type=float, default=400, help="stop after this long")
  parser.add_argument("--cases", nargs="+", default=None,
                      help="only these: grad bwd dq forward index moe (default all)")
  args = parser.parse_args()
  start = time.time()
  failures = collections.Counter()
  with open(args.out, "w") as f:
    for label, fields, fn, fn_args in cases():
      if args.cases and label not in args.cases:
        continue
      if time.time() - start > args.budget_s:
        print(f"budget reached at {label} {fields}")
        break
      failed = compiled(fn, *fn_args)
      row = dict(case=label, **fields, ok=failed is None)
      if failed:
        row.update(requested=failed[0], error=failed[1])
        failures[label] += 1
        print(f"FAIL {label} {fields}: {failed[1][:150]}")
      f.write(json.dumps(row) + "\n")
      f.flush()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {time.time() - start:.0f} s, "
        f"failures by case: {dict(failures)}")


if __name__ == "__main__":
  main()
