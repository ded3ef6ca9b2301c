"""The MoE's expert matmuls at decode batch sizes, against their byte floor.

For MiniMax-M3's experts (E 128, hidden 6144, expert width 3072, top-4) and gen_1b's (E 16,
2048, 1024, top-2), at 1 and 8 tokens: the few-row Triton kernel
(``models.grouped_matmul.tiled``) over a grid of launch parameters, a gather of the routed
experts' weights + einsum, and XLA's ``ragged_dot``; each checked against ``ragged_dot`` in
float32 first, then timed (median of 50). The floor is the distinct routed experts' weight
bytes at the read bandwidth measured in the same process (a looping Pallas read).

    PYTHONPATH=$PWD python3 benchmarks/probes/moe_decode_probe.py --out /tmp/moe
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))

from models import grouped_matmul as gm  # noqa: E402

SHAPES = {"m3": (128, 6144, 3072, 4), "gen_1b": (16, 2048, 1024, 2)}
GRID = [dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st)
        for bn, bk, w, st in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 4))]


def timed(fn, iters=50):
  jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def read_bandwidth():
  from jax.experimental import pallas as pl
  rows = 1 << 20
  x = jax.random.normal(jax.random.PRNGKey(0), (rows, 1024), jnp.bfloat16)

  def kernel(x_ref, o_ref):
    first = pl.program_id(0) * 1024
    acc = jax.lax.fori_loop(0, 64, lambda j, a: a + x_ref[pl.ds(first + j * 16, 16), :]
                            .astype(jnp.float32), jnp.zeros((16, 1024), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=0, keepdims=True)

  fn = jax.jit(lambda x: pl.pallas_call(
      kernel, grid=(rows // 1024,), in_specs=[pl.BlockSpec()],
      out_specs=pl.BlockSpec((1, 1024), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((rows // 1024, 1024), jnp.float32))(x))
  return x.nbytes / timed(lambda: fn(x), 20) / 1e9  # TB/s


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="moe_probe")
  parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
  parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  tbps = read_bandwidth()
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "read_tbps": tbps, "rows": []}
  for name in args.shapes:
    e, h, i, k = SHAPES[name]
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    w = jax.random.normal(ks[0], (e, h, i), jnp.bfloat16)
    for tokens in args.tokens:
      p = tokens * k
      x = jax.random.normal(ks[1], (p, h), jnp.bfloat16)
      ids = jnp.sort(jax.random.randint(ks[2], (p,), 0, e))
      sizes = jnp.bincount(ids, length=e).astype(jnp.int32)
      distinct = int(np.unique(np.asarray(ids)).size)
      floor_ms = distinct * h * i * 2 / (tbps * 1e12) * 1e3
      want = jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
      row = {"shape": name, "tokens": tokens, "pairs": p, "distinct": distinct,
             "floor_ms": floor_ms, "variants": []}
      variants = [("ragged_dot", {}, jax.jit(lambda x, w, s: jax.lax.ragged_dot(x, w, s))),
                  ("gather+einsum", {}, jax.jit(
                      lambda x, w, s: jnp.einsum("ph,phi->pi", x, w[ids])))]
      variants += [("tiled", cfg, jax.jit(functools.partial(gm.tiled, **cfg)))
                   for cfg in GRID]
      for label, cfg, fn in variants:
        entry = {"variant": label, **cfg}
        try:
          got = fn(x, w, sizes).astype(jnp.float32)
          err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
          entry["rel_err"] = err
          if err > 2e-2:
            entry["error"] = "wrong result"
          else:
            entry["ms"] = timed(lambda: fn(x, w, sizes))
            entry["x_floor"] = entry["ms"] / floor_ms
        except Exception as ex:  # noqa: BLE001 (a config that does not compile is skipped)
          entry["error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
        row["variants"].append(entry)
      row["variants"].sort(key=lambda v: v.get("ms", 1e9))
      report["rows"].append(row)
      with open(os.path.join(args.out, "moe_probe.json"), "w") as f:
        json.dump(report, f, indent=1)
    del w
  print(f"read bandwidth {tbps:.2f} TB/s")
  for row in report["rows"]:
    print(f"{row['shape']} tokens {row['tokens']} ({row['distinct']} experts): floor "
          f"{row['floor_ms']:.3f} ms")
    for v in row["variants"][:5]:
      cfg = {k: v[k] for k in ("block_n", "block_k", "num_warps", "num_stages") if k in v}
      print(f"  {v.get('ms', float('nan')):.3f} ms ({v.get('x_floor', float('nan')):.1f}x) "
            f"{v['variant']} {cfg} {v.get('error', '')}")


if __name__ == "__main__":
  main()
