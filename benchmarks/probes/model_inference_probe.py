"""Questions behind the model-level inference path, answered on a GPU in one process.

1. cuDNN flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")``:
   is its ``return_residual`` the natural-log LSE of each query row (so two calls can be
   merged), what does it return for a row with no visible key (``key_value_seq_lengths`` 0)
   or no query (``query_seq_lengths`` 0), and does its time follow the *visible* key length
   (tiles past ``key_value_seq_lengths`` skipped) or the buffer length?
2. MoE at decode batch sizes: ``jax.lax.ragged_dot`` over all stacked experts against a
   gather of the routed experts' weights, against the byte floor of the routed weights.
3. The card's read bandwidth (a read-only reduction) beside its copy bandwidth.

    PYTHONPATH=$PWD python3 benchmarks/probes/model_inference_probe.py --out /tmp/probe

Writes ``probe.json`` under ``--out`` and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, iters=10):
  jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def lse_reference(q, k, q_len, kv_len, causal):
  """float32 LSE [B, T, H] of q·k/sqrt(D) over keys j < kv_len (and j <= t if causal)."""
  b, t, hq, d = q.shape
  g = k.shape[2]
  qf = q.astype(jnp.float32).reshape(b, t, g, hq // g, d)
  s = jnp.einsum("btgjd,bsgd->bgjts", qf, k.astype(jnp.float32)) / np.sqrt(d)
  j = jnp.arange(k.shape[1])
  vis = j[None, None, :] < kv_len[:, None, None]
  if causal:
    vis = vis & (j[None, None, :] <= jnp.arange(t)[None, :, None])
  s = jnp.where(vis[:, None, None], s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)  # [b, g, j, t]
  return jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, hq)


def cudnn_semantics(report):
  b, t, s, hq, g, d = 3, 200, 700, 16, 4, 128
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(ks[0], (b, t, hq, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, s, g, d), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, s, g, d), jnp.bfloat16)
  for causal, q_len, kv_len in ((False, [200, 150, 0], [700, 333, 0]),
                                (False, [200, 150, 7], [0, 333, 5]),
                                (True, [200, 150, 7], [200, 150, 7])):
    ql, kl = jnp.array(q_len, jnp.int32), jnp.array(kv_len, jnp.int32)
    case = f"causal={causal} q_len={q_len} kv_len={kv_len}"
    try:
      out, res = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=causal, query_seq_lengths=ql, key_value_seq_lengths=kl,
          implementation="cudnn", return_residual=True))(q, k, v)
    except Exception as e:  # noqa: BLE001 (the probe reports whatever fails)
      report[case] = f"error: {type(e).__name__}: {str(e)[:300]}"
      continue
    want = lse_reference(q, k, ql, kl, causal)
    rows = []
    for bi in range(b):
      n = q_len[bi]
      r = {"res_shape": list(res.shape), "res_dtype": str(res.dtype)}
      if n:
        got, ref = np.asarray(res[bi, :n], np.float32), np.asarray(want[bi, :n])
        r["lse_max_err"] = float(np.nanmax(np.abs(got - ref))) if np.isfinite(ref).all() \
            else None
        r["res_sample"] = [float(x) for x in got[0, :2]]
        r["ref_sample"] = [float(x) for x in ref[0, :2]]
        r["out_finite"] = bool(np.isfinite(np.asarray(out[bi, :n], np.float32)).all())
        r["out_absmax"] = float(np.abs(np.asarray(out[bi, :n], np.float32)).max())
      pad = np.asarray(out[bi, n:], np.float32)
      r["padding_rows_finite"] = bool(np.isfinite(pad).all()) if pad.size else None
      r["padding_rows_absmax"] = float(np.abs(pad).max()) if pad.size else None
      r["padding_res"] = [float(x) for x in np.asarray(res[bi, n:], np.float32)[:1, 0]]
      rows.append(r)
    report[case] = rows


def cudnn_timing(report):
  hq, g, d = 64, 4, 128
  ks = jax.random.split(jax.random.PRNGKey(1), 3)
  rows = []
  for t, s, kv_len, causal in ((16384, 131072, 131072, False), (16384, 131072, 32768, False),
                               (16384, 131072, 0, False), (65536, 65536, 65536, True),
                               (65536, 1048576, 983040, False)):
    q = jax.random.normal(ks[0], (1, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, s, g, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, s, g, d), jnp.bfloat16)
    ql, kl = jnp.array([t], jnp.int32), jnp.array([kv_len], jnp.int32)
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, query_seq_lengths=ql, key_value_seq_lengths=kl,
        implementation="cudnn", return_residual=True))
    try:
      ms = timed(lambda: fn(q, k, v), iters=5)
    except Exception as e:  # noqa: BLE001
      rows.append({"t": t, "s": s, "kv_len": kv_len, "error": str(e)[:300]})
      continue
    pairs = t * kv_len / (2 if causal else 1)
    rows.append({"t": t, "s": s, "kv_len": kv_len, "causal": causal, "ms": ms,
                 "tflops": 4 * d * hq * pairs / ms / 1e9})
    del q, k, v
  report["cudnn_timing"] = rows


def moe_timing(report):
  rows = []
  for name, e, h, i, k in (("gen_1b", 16, 2048, 1024, 2), ("m3", 128, 6144, 3072, 4)):
    kw = jax.random.split(jax.random.PRNGKey(2), 3)
    w1 = jax.random.normal(kw[0], (e, h, i), jnp.bfloat16)
    w2 = jax.random.normal(kw[1], (e, i, h), jnp.bfloat16)
    for tokens in (1, 8, 8192):
      n = tokens * k
      x = jax.random.normal(kw[2], (n, h), jnp.bfloat16)
      ids = jnp.sort(jax.random.randint(kw[2], (n,), 0, e))
      sizes = jnp.bincount(ids, length=e).astype(jnp.int32)

      @jax.jit
      def ragged(x, w1, w2, sizes):
        a = jax.lax.ragged_dot(x, w1, sizes)
        return jax.lax.ragged_dot(a, w2, sizes)

      @jax.jit
      def gathered(x, w1, w2, ids):
        a = jnp.einsum("nh,nhi->ni", x, w1[ids])
        return jnp.einsum("ni,nih->nh", a, w2[ids])

      @jax.jit
      def looped(x, w1, w2, ids):  # one dynamic slice per routed pair, no gathered copy
        def one(xi, e_):
          a = xi @ jax.lax.dynamic_index_in_dim(w1, e_, keepdims=False)
          return a @ jax.lax.dynamic_index_in_dim(w2, e_, keepdims=False)
        return jax.vmap(one)(x, ids)

      distinct = int(np.unique(np.asarray(ids)).size)
      floor_bytes = distinct * 2 * h * i * 2
      row = {"model": name, "tokens": tokens, "pairs": n, "distinct_experts": distinct,
             "floor_MB": floor_bytes / 1e6}
      variants = [("ragged_dot", ragged, (x, w1, w2, sizes))]
      if tokens > 64:  # prefill scale: the rate of the grouped matmul
        row["flops"] = 2 * 2 * n * h * i
      else:
        variants += [("gather+einsum", gathered, (x, w1, w2, ids)),
                     ("vmap dynamic slice", looped, (x, w1, w2, ids))]
      for label, fn, args in variants:
        try:
          row[label + "_ms"] = timed(lambda: fn(*args), iters=20)
        except Exception as ex:  # noqa: BLE001
          row[label + "_ms"] = f"error {str(ex)[:200]}"
      if "flops" in row and isinstance(row["ragged_dot_ms"], float):
        row["ragged_dot_tflops"] = row["flops"] / row["ragged_dot_ms"] / 1e9
      rows.append(row)
    del w1, w2
  report["moe"] = rows


def full_attention_timing(report):
  """msa_jax.full_attention on M3's full-attention shapes: a prefill chunk after a prefix
  (cuDNN, two calls) and decode (split-K kernel over every block) against its byte floor."""
  import msa_jax
  hq, g, d = 64, 4, 128
  ks = jax.random.split(jax.random.PRNGKey(4), 3)
  rows = []
  for b, t, s, prefix in ((1, 65536, 131072, 65536), (1, 65536, 131072, 0),
                          (1, 1, 131072, 131071), (8, 1, 131072, 131071),
                          (1, 1, 1048576, 1048575), (8, 1, 1048576, 1048575)):
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, g, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, g, d), jnp.bfloat16)
    pos = jnp.broadcast_to(prefix + jnp.arange(t, dtype=jnp.int32), (b, t))
    kvl = jnp.full((b,), prefix + t, jnp.int32)
    fn = jax.jit(lambda q, k, v, pos, kvl: msa_jax.full_attention(
        q, k, v, q_positions=pos, kv_lengths=kvl, implementation="pallas_gpu"))
    row = {"b": b, "t": t, "s": s, "prefix": prefix}
    try:
      row["ms"] = timed(lambda: fn(q, k, v, pos, kvl), iters=5 if t > 1 else 20)
      if t > 1:
        small = 2048  # correctness on the last queries against the XLA path
        ref = jax.jit(lambda q, k, v, pos, kvl: msa_jax.full_attention(
            q, k, v, q_positions=pos, kv_lengths=kvl, implementation="xla"))(
                q[:, -small:], k, v, pos[:, -small:], kvl)
        got = fn(q[:, -small:], k, v, pos[:, -small:], kvl)
        row["rel_err_vs_xla"] = float(jnp.linalg.norm((got - ref).astype(jnp.float32))
                                      / jnp.linalg.norm(ref.astype(jnp.float32)))
        pairs = t * prefix + t * (t + 1) / 2
        row["tflops"] = 4 * d * hq * pairs / row["ms"] / 1e9
      else:
        nbytes = b * (prefix + 1) * g * d * 2 * 2
        row["floor_GB"] = nbytes / 1e9
        row["TBps"] = nbytes / row["ms"] / 1e9
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rows.append(row)
    del q, k, v
  report["full_attention"] = rows


def bandwidth(report):
  x = jax.random.normal(jax.random.PRNGKey(3), (2 ** 30,), jnp.bfloat16)  # 2 GiB
  read = jax.jit(lambda x: jnp.sum(x.reshape(-1, 4096).astype(jnp.float32), axis=0))
  copy = jax.jit(lambda x: x * 2)
  report["read_TBps"] = x.nbytes / timed(lambda: read(x), 20) / 1e9
  report["copy_TBps"] = 2 * x.nbytes / timed(lambda: copy(x), 20) / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="probe_out")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  for part in (cudnn_semantics, bandwidth, full_attention_timing, moe_timing, cudnn_timing):
    try:
      part(report)
    except Exception as e:  # noqa: BLE001
      report[part.__name__] = f"error: {type(e).__name__}: {str(e)[:500]}"
    with open(os.path.join(args.out, "probe.json"), "w") as f:
      json.dump(report, f, indent=1)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
