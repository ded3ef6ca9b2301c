"""Does the decode expert matmul read MXFP8 weights faster than bf16, and is it right?

One grouped matmul of MiniMax-M3's gate projection at decode (128 experts, K = 6144 inputs,
N = 3072 outputs, 4 experts per token), rows routed at random: the few-row Pallas kernel
(``models.grouped_matmul.tiled``) on bf16 weights and on MXFP8 values + scales
(``models.mxfp8``), both timed in this process; the MXFP8 result is checked against
``lax.ragged_dot`` on the dequantised weights in float32. Prints a table, writes JSON.

  python3 benchmarks/probes/mxfp8_decode_experts.py --out results.json
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models import grouped_matmul as gm  # noqa: E402
from models import mxfp8  # noqa: E402
from msa_jax import profiling  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--experts", type=int, default=128)
  parser.add_argument("--k", type=int, default=6144, help="inputs (hidden size)")
  parser.add_argument("--n", type=int, default=3072, help="outputs (expert width)")
  parser.add_argument("--topk", type=int, default=4, help="experts per token")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
  parser.add_argument("--out", default=None, help="write the rows as JSON here")
  args = parser.parse_args()
  key = jax.random.PRNGKey(0)
  w = jax.random.normal(key, (args.experts, args.k, args.n), jnp.float32) / np.sqrt(args.k)
  values, scales = jax.jit(mxfp8.quantize)(w)
  w_bf16 = w.astype(jnp.bfloat16)
  reference = mxfp8.dequantize(values, scales, jnp.float32)
  del w
  interpret = jax.default_backend() == "cpu"  # a CPU smoke run: kernels interpreted
  rows = []
  for batch in args.batches:
    p = batch * args.topk
    ids = jax.random.randint(jax.random.fold_in(key, batch), (p,), 0, args.experts)
    group_sizes = jnp.bincount(ids, length=args.experts).astype(jnp.int32)
    x = jax.random.normal(jax.random.fold_in(key, 7), (p, args.k), jnp.bfloat16)
    dense = jax.jit(lambda x, w, g: gm.tiled(x, w, g, interpret=interpret))
    scaled = jax.jit(lambda x, v, s, g: gm.tiled(x, v, g, scales=s, interpret=interpret))
    got = scaled(x, values, scales, group_sizes)
    want = jax.lax.ragged_dot(x.astype(jnp.float32), reference, group_sizes,
                              precision=jax.lax.Precision.HIGHEST)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
    touched = int(jnp.sum(group_sizes > 0))
    ms_dense, _ = profiling.timed(lambda: profiling.block(dense(x, w_bf16, group_sizes)),
                                  iters=50, budget_s=5.0)
    ms_scaled, _ = profiling.timed(
        lambda: profiling.block(scaled(x, values, scales, group_sizes)), iters=50, budget_s=5.0)
    bytes_dense = touched * args.k * args.n * 2
    bytes_scaled = touched * args.k * args.n * (1 + 1 / mxfp8.BLOCK)
    rows.append(dict(batch=batch, rows=p, experts_touched=touched, rel_err=err,
                     bf16_us=ms_dense * 1e3, mxfp8_us=ms_scaled * 1e3,
                     bf16_tbps=bytes_dense / ms_dense / 1e9,
                     mxfp8_tbps=bytes_scaled / ms_scaled / 1e9))
  meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
              shape=dict(experts=args.experts, k=args.k, n=args.n, topk=args.topk))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
  print(f"{meta['device']} · jax {meta['jax']} · E={args.experts} K={args.k} N={args.n}")
  print("| batch | experts read | rel err | bf16 µs | mxfp8 µs | bf16 TB/s | mxfp8 TB/s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['experts_touched']} | {r['rel_err']:.1e} | {r['bf16_us']:.1f} | "
          f"{r['mxfp8_us']:.1f} | {r['bf16_tbps']:.2f} | {r['mxfp8_tbps']:.2f} |")


if __name__ == "__main__":
  main()
