"""Run the Pallas GPU kernels uninterpreted at MiniMax-M3 shapes and check them against the
reference, with cuDNN dense causal attention timed in the same process.

This is a correctness check on real hardware, not the benchmark (scripts/benchmark.py, the
performance issue): timings are printed for orientation, as medians of ``--iters`` calls.

Example:  python3 scripts/gpu_check.py --sizes 8192 32768 --output-json /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from models import cli
import msa_jax
from msa_jax import reference


def _time(fn, *args, iters):
  out = jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return out, statistics.median(times) * 1e3


def _rel_err(x, ref):
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def check_size(n, args):
  hq, g, d, di, bs, topk = 64, 4, 128, 128, 128, 16
  dtype = jnp.bfloat16
  keys = jax.random.split(jax.random.PRNGKey(n), 5)
  q = jax.random.normal(keys[0], (1, n, hq, d), dtype)
  k = jax.random.normal(keys[1], (1, n, g, d), dtype)
  v = jax.random.normal(keys[2], (1, n, g, d), dtype)
  q_idx = jax.random.normal(keys[3], (1, n, g, di), dtype)
  k_idx = jax.random.normal(keys[4], (1, n, di), dtype)
  row = {"N": n}

  def index(impl):
    return jax.jit(lambda a, b: msa_jax.index_topk(a, b, block_size=bs, topk=topk,
                                                   implementation=impl))

  def sparse(impl):
    return jax.jit(lambda q, k, v, ids: msa_jax.sparse_attention(
        q, k, v, ids, block_size=bs, return_lse=True, implementation=impl))

  ids_ref, row["index_xla_ms"] = _time(index("xla"), q_idx, k_idx, iters=args.iters)
  try:
    ids_gpu, row["index_pallas_ms"] = _time(index("pallas_gpu"), q_idx, k_idx, iters=args.iters)
    same = np.all(np.sort(np.asarray(ids_gpu), -1) == np.sort(np.asarray(ids_ref), -1), -1)
    row["index_set_match"] = float(same.mean())
    # Where sets differ, the block scores must be near-tied (bf16 GEMM summation order).
    scores = np.asarray(jax.jit(lambda a, b: reference.block_scores(
        a, b, reference.default_q_positions(n, jnp.array([n], jnp.int32)),
        jnp.array([n], jnp.int32), block_size=bs))(q_idx, k_idx))
    own = np.arange(n) // bs
    worst = 0.0
    for t, gg in zip(*np.nonzero(~same[0])):
      sc = scores[0, t, gg].copy()
      sc[own[t]] = np.inf
      a = np.asarray(ids_gpu)[0, t, gg]
      bsel = np.asarray(ids_ref)[0, t, gg]
      worst = max(worst, float(np.min(sc[bsel[bsel >= 0]]) - np.min(sc[a[a >= 0]])))
    row["index_worst_score_gap"] = worst
  except Exception:  # keep going: the rest of the run still says something
    row["index_error"] = traceback.format_exc(limit=3)
  (o_ref, l_ref), row["sparse_xla_ms"] = _time(sparse("xla"), q, k, v, ids_ref, iters=args.iters)
  try:
    (o_g, l_g), row["sparse_pallas_ms"] = _time(sparse("pallas_gpu"), q, k, v, ids_ref,
                                                iters=args.iters)
    row["out_rel_err"] = _rel_err(o_g, o_ref)
    row["lse_max_abs_err"] = float(np.max(np.abs(np.asarray(l_g) - np.asarray(l_ref))))
    row["out_finite"] = bool(np.isfinite(np.asarray(o_g, np.float32)).all())
  except Exception:
    row["sparse_error"] = traceback.format_exc(limit=3)
  try:
    msa = jax.jit(lambda *a: msa_jax.msa_attention(*a, block_size=bs, topk=topk,
                                                   implementation="pallas_gpu"))
    _, row["msa_pallas_ms"] = _time(msa, q, k, v, q_idx, k_idx, iters=args.iters)
  except Exception:
    row["msa_error"] = traceback.format_exc(limit=3)
  try:
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"))
    _, row["dense_cudnn_ms"] = _time(dense, q, k, v, iters=args.iters)
  except Exception:
    row["dense_error"] = traceback.format_exc(limit=3)
  return row


def check_decode(ctx, q_len, args):
  """Decode step(s): batch 2, ``q_len`` new queries per sequence against ``ctx`` cached keys."""
  hq, g, d, di, bs, topk, b = 64, 4, 128, 128, 128, 16, 2
  keys = jax.random.split(jax.random.PRNGKey(ctx + q_len), 5)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.bfloat16)
  q, k, v = (normal(keys[0], (b, q_len, hq, d)), normal(keys[1], (b, ctx, g, d)),
             normal(keys[2], (b, ctx, g, d)))
  q_idx, k_idx = normal(keys[3], (b, q_len, g, di)), normal(keys[4], (b, ctx, di))
  kv_lengths = jnp.array([ctx, ctx - 777], jnp.int32)  # ragged: the second is shorter
  row = {"decode_context": ctx, "q_len": q_len}

  def msa(impl):
    return jax.jit(lambda *a: msa_jax.msa_attention(
        *a, block_size=bs, topk=topk, kv_lengths=kv_lengths, return_indices=True,
        implementation=impl))

  (o_ref, ids_ref), row["msa_xla_ms"] = _time(msa("xla"), q, k, v, q_idx, k_idx,
                                              iters=args.iters)
  try:
    (o_g, ids_g), row["msa_pallas_ms"] = _time(msa("pallas_gpu"), q, k, v, q_idx, k_idx,
                                               iters=args.iters)
    same = np.all(np.sort(np.asarray(ids_g), -1) == np.sort(np.asarray(ids_ref), -1), -1)
    row["index_set_match"] = float(same.mean())
    if same.all():  # same selection: the outputs must agree to bf16 tolerance
      row["out_rel_err"] = _rel_err(o_g, o_ref)
  except Exception:
    row["msa_error"] = traceback.format_exc(limit=3)
  # The same cache as shuffled pages of one block each, through paged_msa_decode.
  nb = ctx // bs
  perm = np.random.default_rng(ctx).permutation(b * nb)
  to_pages = lambda x: x.reshape(b * nb, bs, *x.shape[2:])[np.argsort(perm)]
  table = jnp.asarray(perm.reshape(b, nb), jnp.int32)
  paged = jax.jit(lambda q, q_idx, *cache: msa_jax.paged_msa_decode(
      q, q_idx, *cache, block_size=bs, topk=topk, return_indices=True,
      implementation="pallas_gpu"))
  try:
    (o_p, ids_p), row["paged_pallas_ms"] = _time(
        paged, q, q_idx, to_pages(k), to_pages(v), to_pages(k_idx), table, kv_lengths,
        iters=args.iters)
    same = np.all(np.sort(np.asarray(ids_p), -1) == np.sort(np.asarray(ids_ref), -1), -1)
    row["paged_index_set_match"] = float(same.mean())
    if same.all():
      row["paged_out_rel_err"] = _rel_err(o_p, o_ref)
  except Exception:
    row["paged_error"] = traceback.format_exc(limit=3)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=cli.HelpFormatter)
  parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768],
                      help="context lengths N (batch 1, causal prefill)")
  parser.add_argument("--iters", type=int, default=10, help="timed calls per measurement")
  parser.add_argument("--decode-contexts", type=int, nargs="*", default=[65536],
                      help="cached tokens of the decode checks (batch 2, 1 and 8 queries)")
  parser.add_argument("--output-json", default=None, help="write the rows as JSON here")
  args = parser.parse_args(argv)
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
  except OSError:
    commit = ""
  commit = commit or cli.commit()
  meta = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
          "commit": commit, "date": datetime.date.today().isoformat()}
  print(json.dumps(meta), flush=True)
  rows = []
  for n in args.sizes:
    rows.append(check_size(n, args))
    print(json.dumps(rows[-1]), flush=True)
  decode_rows = []
  for ctx in args.decode_contexts:
    for q_len in (1, 8):
      decode_rows.append(check_decode(ctx, q_len, args))
      print(json.dumps(decode_rows[-1]), flush=True)
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump({"meta": meta, "rows": rows, "decode": decode_rows}, f, indent=1)
  cols = ["N", "index_set_match", "out_rel_err", "lse_max_abs_err", "index_pallas_ms",
          "sparse_pallas_ms", "msa_pallas_ms", "index_xla_ms", "sparse_xla_ms", "dense_cudnn_ms"]
  print("| " + " | ".join(cols) + " |")
  for r in rows:
    cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
    print("| " + " | ".join(cells) + " |")
  cols = ["decode_context", "q_len", "index_set_match", "out_rel_err", "msa_pallas_ms",
          "msa_xla_ms", "paged_index_set_match", "paged_out_rel_err", "paged_pallas_ms"]
  print("| " + " | ".join(cols) + " |")
  for r in decode_rows:
    cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
    print("| " + " | ".join(cells) + " |")
  return 0


run = cli.console_command(main)


if __name__ == "__main__":
  run()
