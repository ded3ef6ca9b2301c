"""The Mosaic GPU index top-k kernel against the Triton one, on the last prefill chunk.

For each context, times the selection of the last ``--chunk`` queries (M3 index shapes, bf16)
by the Triton fused kernel (this card's tuning table) and by ``index_topk_mgpu`` at several
ring depths, in bf16 and in FP8 (float8_e4m3fn, one power-of-two scale per token), on random
and structured index inputs, after checking that the bf16 Mosaic kernel's selection agrees
with the Triton kernel's (share of equal blocks; f32 accumulation orders differ, so near ties
may not) and measuring how much of the bf16 selection the FP8 one keeps (its recall). Reports TFLOP/s of the causal scoring FLOPs
(``2 * Di * G`` per visible query-key pair) beside the bf16 matmul ceiling measured in the
same process. Needs a GPU::

    PYTHONPATH=$PWD python3 benchmarks/probes/index_mosaic.py --out results.json
"""

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

import msa_jax
from models.cli import benchmark as bench
from msa_jax import reference, workloads
from msa_jax.ops.index_topk import gpu_triton as triton_kernel
from msa_jax.ops.index_topk import gpu_mosaic as mosaic_kernel
from msa_jax import tuning


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--contexts", type=int, nargs="+", default=[131072, 1048576])
  parser.add_argument("--chunk", type=int, default=65536)
  parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4, 6])
  parser.add_argument("--fp8-stages", type=int, nargs="+", default=[4, 6, 8])
  parser.add_argument("--selections", nargs="+", default=list(bench.SELECTIONS))
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--skip-triton", action="store_true",
                      help="do not time the Triton kernel (its selection is still the reference)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  w = bench.M3
  ceil = bench.ceilings(argparse.Namespace(iters=10), small=False)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"matmul {ceil['matmul_tflops']:.0f} TFLOP/s", flush=True)
  rows = []
  for n in args.contexts:
    c = min(args.chunk, n)
    pos = (n - c + jnp.arange(c, dtype=jnp.int32))[None]
    kvl = jnp.array([n], jnp.int32)
    pairs = float(np.sum(np.minimum(np.asarray(pos[0], np.float64) + 1, n)))
    flops = 2 * w.index_dim * w.groups * pairs
    for selection in args.selections:
      q_idx, k_idx = bench.index_inputs(selection, jax.random.PRNGKey(n), 1, n, c, w)
      common = dict(block_size=w.block_size, topk=w.topk)
      triton = jax.jit(lambda qi, ki: triton_kernel.fused_topk(qi, ki, pos, kvl, **common))
      want = triton(q_idx, k_idx)
      variants = [] if args.skip_triton else [("triton fused", triton)]
      for s in args.stages:
        variants.append((f"mosaic, {s} stages", jax.jit(
            lambda qi, ki, s=s: mosaic_kernel.fused_topk(qi, ki, pos, kvl, num_stages=s,
                                                         **common))))
      # FP8: the kernel on inputs quantized beforehand (as an FP8 cache would hold them),
      # and the API call that quantizes inside.
      q8, _ = reference.fp8_per_token(q_idx)
      k8, k_scale = reference.fp8_per_token(k_idx)
      fp8_inputs = (q8, k8, k_scale)
      for s in args.fp8_stages:
        variants.append((f"mosaic FP8, {s} stages", jax.jit(
            lambda q8, k8, ks, s=s: mosaic_kernel.fused_topk(q8, k8, pos, kvl, num_stages=s,
                                                             k_scale=ks, **common))))
      k8b, block_scale = reference.fp8_per_block(k_idx, w.block_size)
      fp8_block_inputs = (q8, k8b, block_scale)
      for s in args.fp8_stages:
        variants.append((f"mosaic FP8 block scales, {s} stages", jax.jit(
            lambda q8, k8, bs, s=s: mosaic_kernel.fused_topk(
                q8, k8, pos, kvl, num_stages=s, k_block_scale=bs, **common))))
      variants.append(("API FP8 (quantizes)", jax.jit(
          lambda qi, ki: msa_jax.index_topk(qi, ki, q_positions=pos, kv_lengths=kvl,
                                            score_dtype="float8_e4m3fn", **common))))
      bf16 = None
      for name, fn in variants:
        inputs = ((fp8_block_inputs if "block scales" in name else fp8_inputs)
                  if name.startswith("mosaic FP8") else (q_idx, k_idx))
        try:
          got = fn(*inputs)
          if name.startswith("mosaic,") and bf16 is None:
            bf16 = got  # FP8 rows: agreement with the bf16 Mosaic selection (the recall)
          reference_ids = want if bf16 is None or "FP8" not in name else bf16
          agree = workloads.selection_recall(got, reference_ids)
          ms, _ = bench.timed(lambda: jax.block_until_ready(fn(*inputs)),
                              iters=args.iters, budget_s=4)
        except Exception as e:  # a variant that does not compile: report, go on
          print(f"{name}: {type(e).__name__}: {str(e)[:400]}", flush=True)
          continue
        tflops = flops / (ms * 1e-3) / 1e12
        row = dict(N=n, chunk=c, selection=selection, variant=name, ms=ms, tflops=tflops,
                   of_ceiling=tflops / ceil["matmul_tflops"], agreement=agree)
        rows.append(row)
        print(f"| {n} | {selection} | {name} | {ms:.2f} | {tflops:.0f} | "
              f"{row['of_ceiling']:.2f} | {agree:.4f} |", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                 "ceilings": ceil, "table": dataclasses.asdict(tuning.config("index")), "rows": rows}, f, indent=1)
  print("\n| N | selection | variant | ms | TFLOP/s | of matmul | agreement |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['N']} | {r['selection']} | {r['variant']} | {r['ms']:.2f} | "
          f"{r['tflops']:.0f} | {r['of_ceiling']:.2f} | {r['agreement']:.4f} |")


if __name__ == "__main__":
  main()
