"""Benchmark MSA against dense attention on one accelerator (protocol: docs/benchmarks.md).

Times, in one process and on one card: MSA prefill (index + top-k, sparse attention with its
schedule and combine, and the whole layer) against dense causal GQA through cuDNN at each
context length N; MSA decode against the faster of an XLA einsum-softmax-einsum over the whole
cache and Pallas' ``decode_attention.gqa``; and the two ceilings (an 8192^3 bf16 matmul and a
large device-to-device copy). Writes ``<output-dir>/<tag>.json``, ``<tag>.md`` (the table) and
``<tag>.png`` (log-log latency vs N), and prints the table last.

Prefill above ``--chunk`` tokens runs chunked: queries in chunks of ``--chunk`` against the
growing KV prefix (how long prompts are served); times are summed over the chunks.

``--smoke`` runs tiny shapes through the ``xla`` path and the Pallas GPU kernels in interpret
mode, so the script itself is tested on CPU (numbers from it mean nothing).

Examples:
  python3 scripts/benchmark.py                          # the full workload on a GPU
  python3 scripts/benchmark.py --sizes 8192 32768 --skip-decode
  python3 scripts/benchmark.py --smoke --output-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from models import cli
import msa_jax
from msa_jax import profiling
from msa_jax import workloads


Workload, M3, SMOKE = workloads.Workload, workloads.M3, workloads.SMOKE


# ----------------------------------------------------------------------------- timing


timed, block = profiling.timed, profiling.block


def in_loop(fn, steps: int):
  """``steps`` dependent calls of ``fn(q, *rest)`` inside one jitted ``fori_loop``.

  Timing this and dividing by ``steps`` gives the per-step device time of a decode step
  without the host's per-call dispatch: how a served model runs it (one program for all
  layers, or a CUDA graph, as in docs/benchmarks.md's reference points). Each step's q depends on
  the previous output (a nudge far below bf16 resolution), so nothing is hoisted out.
  """
  @jax.jit
  def run(q, *rest):
    def body(_, carry):
      q, acc = carry
      out = fn(q, *rest)
      nudge = jnp.minimum(jnp.abs(out.reshape(-1)[0].astype(jnp.float32)), 1.0) * 1e-30
      return q + nudge.astype(q.dtype), acc + nudge

    return jax.lax.fori_loop(0, steps, body, (q, jnp.float32(0)))

  return run


def _random(key, shape, dtype):
  return jax.random.normal(key, shape, dtype)  # in the target dtype: no float32 copy


SELECTIONS = ("random", "structured", "mixed")
MIXED_STRETCH = 4096  # queries per stretch of the "mixed" selection


def index_inputs(selection, key, batch, length, queries, w: Workload):
  """``q_idx [batch, queries, G, Di]`` (the last ``queries`` positions) and ``k_idx [batch,
  length, Di]``: random normal, or with the structure of a trained indexer's selections
  (``msa_jax.workloads``: sink, recency and content blocks shared by neighbouring queries),
  built one sequence at a time to bound the float32 temporaries; or "mixed": structured
  keys, with stretches of ``MIXED_STRETCH`` queries alternating structured and random index
  queries (neighbours that share their blocks, then neighbours that do not)."""
  dtype = jnp.dtype(w.dtype)
  if selection == "mixed":
    q_idx, k_idx = index_inputs("structured", key, batch, length, queries, w)
    noise = _random(jax.random.fold_in(key, 1), q_idx.shape, dtype)
    stretch = (length - queries + jnp.arange(queries)) // MIXED_STRETCH
    return jnp.where((stretch % 2 == 1)[None, :, None, None], noise, q_idx), k_idx
  if selection == "random":
    kq, kk = jax.random.split(key)
    return (_random(kq, (batch, queries, w.groups, w.index_dim), dtype),
            _random(kk, (batch, length, w.index_dim), dtype))
  features = min(16, (w.index_dim - 5) // 4)
  build = jax.jit(lambda key: workloads.structured_index_inputs(
      key, 1, length, w.groups, w.index_dim, block_size=w.block_size,
      recency=8.0 * w.block_size, segment=2 * w.block_size, hits=max(1, w.topk // 2),
      features=features, query_start=length - queries, dtype=dtype))
  rows = [build(k) for k in jax.random.split(key, batch)]
  return tuple(jnp.concatenate(parts) for parts in zip(*rows))


# ----------------------------------------------------------------------------- ceilings


def ceilings(args, small: bool):
  n = 512 if small else 8192
  a = _random(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  b = _random(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  t_mm, _ = timed(lambda: block(mm(a, b)), iters=args.iters, budget_s=5)
  size = 1 << (20 if small else 31)  # 2 GiB of bf16
  x = _random(jax.random.PRNGKey(3), (size // 2,), jnp.bfloat16)
  cp = jax.jit(lambda x: x * jnp.asarray(1.5, x.dtype))
  t_cp, _ = timed(lambda: block(cp(x)), iters=args.iters, budget_s=5)
  from models.cli import benchmark_model
  return {"matmul_tflops": 2 * n ** 3 / (t_mm * 1e-3) / 1e12,
          "copy_tbps": 2 * x.size * 2 / (t_cp * 1e-3) / 1e12,
          "matmul_n": n, "copy_bytes": 2 * x.size * 2, **benchmark_model.read_bandwidth(small)}


# ----------------------------------------------------------------------------- prefill


def useful_pairs(n: int, w: Workload) -> float:
  """Visible query-key pairs per (query, group) summed over a causal prefill of length n."""
  p = np.arange(n, dtype=np.float64)
  return float(np.minimum(p + 1, (w.topk - 1) * w.block_size + p % w.block_size + 1).sum())


def kernel_tflops(row, workload: dict):
  """The sparse kernel alone, on the last queries of the prefill (``sparse_breakdown``):
  TFLOP/s of its useful FLOPs (None without a breakdown)."""
  if not row.get("last_chunk_kernel_ms"):
    return None
  w = Workload(**workload)
  n, q = row["N"], row.get("breakdown_queries", min(row["N"], row["chunk"]))
  pairs = useful_pairs(n, w) - useful_pairs(n - q, w)
  return 4 * w.head_dim * w.q_heads * pairs / (row["last_chunk_kernel_ms"] * 1e-3) / 1e12


def prefill_row(n, w: Workload, args, impl, interpret, selection="random", dense=None):
  """One prefill row on ``selection`` index inputs; ``dense`` (a dict) keeps the dense
  baseline's timings per N, so a second selection at the same N does not time it again."""
  dtype = jnp.dtype(w.dtype)
  keys = jax.random.split(jax.random.PRNGKey(n), 5)
  q = _random(keys[0], (1, n, w.q_heads, w.head_dim), dtype)
  k = _random(keys[1], (1, n, w.groups, w.head_dim), dtype)
  v = _random(keys[2], (1, n, w.groups, w.head_dim), dtype)
  q_idx, k_idx = index_inputs(selection, keys[3], 1, n, n, w)
  chunk = min(n, args.chunk)
  starts = [jnp.int32(s) for s in range(0, n, chunk)]
  common = dict(block_size=w.block_size, implementation=impl, interpret=interpret)

  def positions(start):
    return start + jnp.arange(chunk, dtype=jnp.int32)[None], jnp.array([start + chunk],
                                                                         jnp.int32)

  # Chunks are sliced inside the jitted functions: one compilation, no copies of q held.
  sl = lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)

  @jax.jit
  def index(q_idx, k_idx, start):
    pos, kvl = positions(start)
    return msa_jax.index_topk(sl(q_idx, start), k_idx, topk=w.topk, q_positions=pos,
                              kv_lengths=kvl, score_dtype=w.index_score_dtype, **common)

  @jax.jit
  def sparse(q, k, v, ids, start):
    pos, kvl = positions(start)
    return msa_jax.sparse_attention(sl(q, start), k, v, ids, q_positions=pos, kv_lengths=kvl,
                                    **common)

  @jax.jit
  def layer(q, k, v, q_idx, k_idx, start):
    pos, kvl = positions(start)
    return msa_jax.msa_attention(sl(q, start), k, v, sl(q_idx, start), k_idx, topk=w.topk,
                                 q_positions=pos, kv_lengths=kvl,
                                 score_dtype=w.index_score_dtype, **common)

  ids = [index(q_idx, k_idx, s) for s in starts]
  row = {"N": n, "selection": selection, "chunk": chunk, "chunks": len(starts)}
  nb = -(-n // w.block_size)
  row["union8"] = sum(float(workloads.union_size(i, nb, 8)) for i in ids) / len(ids)
  budget = args.budget_s
  row["index_ms"], row["index_iters"] = timed(
      lambda: block([index(q_idx, k_idx, s) for s in starts]), iters=args.iters,
      budget_s=budget)
  row["sparse_ms"], row["sparse_iters"] = timed(
      lambda: block([sparse(q, k, v, i, s) for i, s in zip(ids, starts)]),
      iters=args.iters, budget_s=budget)
  row["msa_ms"], row["msa_iters"] = timed(
      lambda: block([layer(q, k, v, q_idx, k_idx, s) for s in starts]),
      iters=args.iters, budget_s=budget)
  if impl in (None, "pallas_gpu") and (interpret or jax.default_backend() == "gpu"):
    from msa_jax.ops.index_topk import gpu_triton as index_kernel
    scores = jax.jit(lambda q_idx, k_idx, s: index_kernel.block_scores(
        sl(q_idx, s), k_idx, *positions(s), block_size=w.block_size, interpret=interpret))
    row["last_chunk_index_scores_ms"], _ = timed(
        lambda: block(scores(q_idx, k_idx, starts[-1])), iters=args.iters, budget_s=budget / 3)
    row["last_chunk_index_total_ms"], _ = timed(
        lambda: block(index(q_idx, k_idx, starts[-1])), iters=args.iters, budget_s=budget / 3)
    row.update(sparse_breakdown(sl(q, starts[-1]), k, v, ids[-1], positions(starts[-1]), w,
                                args, interpret))
  row["peak_bytes"] = _peak_bytes()
  pairs = useful_pairs(n, w)
  row["sparse_tflops"] = 4 * w.head_dim * w.q_heads * pairs / (row["sparse_ms"] * 1e-3) / 1e12
  row["index_tflops"] = (2 * w.index_dim * w.groups * n * (n + 1) / 2
                         / (row["index_ms"] * 1e-3) / 1e12)
  row["flop_ratio"] = (2 * w.q_heads * w.head_dim * n * n) / (
      w.groups * w.index_dim * n * n + 4 * w.q_heads * w.head_dim * n * w.topk * w.block_size)

  dense = {} if dense is None else dense
  if n not in dense:
    dense[n] = dense_prefill(q, k, v, w, args)
  row.update(dense[n])
  if "dense_ms" in row:
    row["speedup"] = row["dense_ms"] / row["msa_ms"]
  return row


def dense_prefill(q, k, v, w: Workload, args) -> dict:
  """Dense causal attention through cuDNN (XLA off GPUs): its time and TFLOP/s."""
  n = q.shape[1]
  dense_impl = "cudnn" if jax.default_backend() == "gpu" else None
  dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                               implementation=dense_impl))
  out = {}
  try:
    out["dense_ms"], out["dense_iters"] = timed(lambda: block(dense(q, k, v)), iters=args.iters,
                                                budget_s=args.dense_budget_s)
    out["dense_tflops"] = (4 * w.head_dim * w.q_heads * n * (n + 1) / 2
                           / (out["dense_ms"] * 1e-3) / 1e12)
  except Exception as e:  # e.g. out of memory at 1M: report, keep going
    out["dense_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  return out


def sparse_breakdown(q_c, k, v, ids, pos_len, w: Workload, args, interpret):
  """Times the KV-outer path's three stages on the last queries of one chunk (the last: the
  longest prefix): the chunk's last piece where the path runs in pieces of ``query_chunk``
  queries (the tuning table), else the whole chunk; with the kernel the API picks."""
  from msa_jax.ops.sparse_attention import paths as sparse_paths
  from msa_jax import reference
  from msa_jax import schedule as sched
  from msa_jax import tuning
  pos, kvl = pos_len
  shape = tuning.shape(k.shape[1], q_c.shape[1])  # the lookups the path makes for this chunk
  piece = tuning.config("sparse", shape=shape).query_chunk or q_c.shape[1]
  start = (q_c.shape[1] - 1) // piece * piece
  q_c, ids, pos = q_c[:, start:], ids[:, start:], pos[:, start:]
  kernel = sparse_paths.gpu_sparse_kernel(q_c, k, v, w.block_size, shape)
  nb = reference.cdiv(k.shape[1], w.block_size)
  per_tile, per_item = kernel.work_item_size(
      w.q_heads // w.groups, tile_rows=sparse_paths.INTERPRET_TILE_ROWS if interpret else None,
      shape=shape)
  scale = 1 / math.sqrt(w.head_dim)

  @jax.jit
  def build(ids, pos):
    valid = reference.valid_block_mask(ids, nb)
    return valid, sched.build_schedule(ids, valid, pos, nb, per_item)

  partials = jax.jit(lambda q, k, v, s, kvl: kernel.sparse_attention_partials(
      q, k, v, s, kvl, block_size=w.block_size, scale=scale, topk=w.topk,
      queries_per_tile=per_tile, tiles_per_item=per_item // per_tile, shape=shape,
      interpret=interpret))
  combine = jax.jit(lambda o, l, valid: sched.combine(o, l, valid, q_c.dtype))
  valid, schedule = build(ids, pos)
  p_out, p_lse = partials(q_c, k, v, schedule, kvl)
  out = {}
  out["last_chunk_schedule_ms"], _ = timed(lambda: block(build(ids, pos)), iters=args.iters,
                                           budget_s=args.budget_s / 3)
  # The kernel alone: return one LSE element, so the partial buffers are not sliced (copied)
  # as outputs of the timed program, as they are not inside the layer (the combine reads them).
  kernel_only = jax.jit(lambda *a: partials(*a)[1][0, 0, 0, 0])
  out["last_chunk_kernel_ms"], _ = timed(lambda: block(kernel_only(q_c, k, v, schedule, kvl)),
                                         iters=args.iters, budget_s=args.budget_s / 3)
  out["last_chunk_combine_ms"], _ = timed(lambda: block(combine(p_out, p_lse, valid)),
                                          iters=args.iters, budget_s=args.budget_s / 3)
  out["breakdown_queries"] = q_c.shape[1]
  out["breakdown_kernel"] = kernel.__name__.rsplit(".", 1)[-1]
  out["work_items_used"] = int(schedule.num_items)
  out["work_items_max"] = schedule.max_items
  return out


def _peak_bytes():
  try:
    return int(jax.devices()[0].memory_stats().get("peak_bytes_in_use", -1))
  except Exception:  # backends without memory stats (CPU)
    return -1


# ----------------------------------------------------------------------------- decode


def decode_row(batch, ctx, q_len, w: Workload, args, impl, interpret, selection="random",
               dense=None):
  """One decode row on ``selection`` index inputs; ``dense`` (a dict) keeps the dense
  baselines' timings per (batch, context, queries) across selections."""
  dtype = jnp.dtype(w.dtype)
  keys = jax.random.split(jax.random.PRNGKey(batch * 7 + ctx + q_len), 5)
  q = _random(keys[0], (batch, q_len, w.q_heads, w.head_dim), dtype)
  k = _random(keys[1], (batch, ctx, w.groups, w.head_dim), dtype)
  v = _random(keys[2], (batch, ctx, w.groups, w.head_dim), dtype)
  q_idx, k_idx = index_inputs(selection, keys[3], batch, ctx, q_len, w)
  msa_step = lambda *a: msa_jax.msa_attention(
      *a, block_size=w.block_size, topk=w.topk, implementation=impl, interpret=interpret,
      score_dtype=w.index_score_dtype)
  msa = jax.jit(msa_step)
  steps = args.decode_loop_steps
  msa_loop = in_loop(msa_step, steps)
  row = {"batch": batch, "context": ctx, "q_len": q_len, "selection": selection,
         "loop_steps": steps}
  row["msa_ms"], row["msa_iters"] = timed(lambda: block(msa(q, k, v, q_idx, k_idx)),
                                          iters=args.iters, budget_s=args.budget_s)
  ms, _ = timed(lambda: block(msa_loop(q, k, v, q_idx, k_idx)), iters=args.iters,
                budget_s=args.budget_s)
  row["msa_loop_ms"] = ms / steps
  # Breakdown: the selection and the attention over it, each alone.
  index = jax.jit(lambda qi, ki: msa_jax.index_topk(
      qi, ki, block_size=w.block_size, topk=w.topk, implementation=impl, interpret=interpret,
      score_dtype=w.index_score_dtype))
  sparse = jax.jit(lambda q, k, v, ids: msa_jax.sparse_attention(
      q, k, v, ids, block_size=w.block_size, implementation=impl, interpret=interpret))
  ids = index(q_idx, k_idx)
  if q_len > 1:  # the blocks the row's consecutive queries select together
    row[f"union{q_len}"] = float(workloads.union_size(ids, -(-ctx // w.block_size), q_len))
  row["index_ms"], _ = timed(lambda: block(index(q_idx, k_idx)), iters=args.iters,
                             budget_s=args.budget_s / 3)
  if impl in (None, "pallas_gpu") and (interpret or jax.default_backend() == "gpu"):
    from msa_jax.ops.index_topk import gpu_triton as index_kernel
    pos = jnp.broadcast_to(ctx - q_len + jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
    scores = jax.jit(lambda qi, ki: index_kernel.block_scores(
        qi, ki, pos, jnp.full((batch,), ctx, jnp.int32), block_size=w.block_size,
        interpret=interpret))
    row["index_scores_kernel_ms"], _ = timed(lambda: block(scores(q_idx, k_idx)),
                                             iters=args.iters, budget_s=args.budget_s / 3)
  row["sparse_ms"], _ = timed(lambda: block(sparse(q, k, v, ids)), iters=args.iters,
                              budget_s=args.budget_s / 3)
  dense = {} if dense is None else dense
  if (batch, ctx, q_len) not in dense:
    dense[batch, ctx, q_len] = dense_decode(q, k, v, w, args)
  row.update(dense[batch, ctx, q_len])
  for suffix in ("", "_loop"):
    if f"dense_best{suffix}_ms" in row:
      row[f"speedup{suffix}"] = row[f"dense_best{suffix}_ms"] / row[f"msa{suffix}_ms"]
  item = jnp.dtype(dtype).itemsize
  must_move = batch * (ctx * w.index_dim * item  # every cached index key
                       + q_len * w.groups * w.topk * w.block_size * 2 * w.head_dim * item
                       + 2 * q_len * w.q_heads * w.head_dim * item)  # q in, o out
  row["bytes_must_move"] = must_move
  row["achieved_tbps"] = must_move / (row["msa_ms"] * 1e-3) / 1e12
  row["achieved_tbps_loop"] = must_move / (row["msa_loop_ms"] * 1e-3) / 1e12
  return row


def add_byte_floor(row: dict, ceilings: dict) -> dict:
  """The decode row's byte floor (its bytes that must move at the read ceiling measured in
  the same process) and its times as multiples of it."""
  if "bytes_must_move" in row and ceilings.get("read_tbps"):
    row["floor_ms"] = row["bytes_must_move"] / (ceilings["read_tbps"] * 1e12) * 1e3
    row["x_floor"] = row["msa_ms"] / row["floor_ms"]
    row["x_floor_loop"] = row["msa_loop_ms"] / row["floor_ms"]
  return row


def dense_decode(q, k, v, w: Workload, args) -> dict:
  """The dense decode baselines (an XLA einsum-softmax-einsum; Pallas' ``gqa`` for one query
  on GPUs), per call and per step in a jitted loop, and the best of them."""
  batch, q_len = q.shape[:2]
  ctx = k.shape[1]
  steps = args.decode_loop_steps
  row = {}

  def dense_xla(q, k, v):
    hpg = w.q_heads // w.groups
    qg = q.reshape(batch, q_len, w.groups, hpg, w.head_dim)
    s = jnp.einsum("btghd,bsgd->bghts", qg, k, preferred_element_type=jnp.float32)
    s = s / math.sqrt(w.head_dim)
    causal = jnp.arange(ctx)[None, :] <= (ctx - q_len + jnp.arange(q_len))[:, None]
    s = jnp.where(causal, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bghts,bsgd->btghd", p.astype(v.dtype), v)
    return o.reshape(q.shape)

  baselines = {"xla": dense_xla}
  if q_len == 1 and jax.default_backend() == "gpu":
    from jax.experimental.pallas.ops.gpu import decode_attention
    baselines["pallas_gqa"] = lambda q, k, v: decode_attention.gqa(q[:, 0], k, v)[:, None]
  for name, fn in baselines.items():
    try:
      call, loop = jax.jit(fn), in_loop(fn, steps)
      row[f"dense_{name}_ms"], _ = timed(lambda: block(call(q, k, v)), iters=args.iters,
                                         budget_s=args.budget_s)
      ms, _ = timed(lambda: block(loop(q, k, v)), iters=args.iters, budget_s=args.budget_s)
      row[f"dense_{name}_loop_ms"] = ms / steps
    except Exception as e:
      row[f"dense_{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  for suffix in ("", "_loop"):
    dense = [row[f"dense_{n}{suffix}_ms"] for n in baselines if f"dense_{n}{suffix}_ms" in row]
    if dense:
      row[f"dense_best{suffix}_ms"] = min(dense)
  return row


def paged_decode_row(batch, ctx, q_len, w: Workload, args, impl, interpret):
  """One decode step on a paged cache (pages shuffled in memory, as after serving a while):
  ``paged_msa_decode`` vs dense paged attention over every page (Pallas ``paged_attention``,
  GPU, one query token) or the XLA einsum over the gathered cache (elsewhere)."""
  dtype = jnp.dtype(w.dtype)
  bk = w.block_size
  pages_per_seq = -(-ctx // bk)
  num_pages = batch * pages_per_seq
  keys = jax.random.split(jax.random.PRNGKey(batch * 11 + ctx + q_len), 6)
  q = _random(keys[0], (batch, q_len, w.q_heads, w.head_dim), dtype)
  q_idx = _random(keys[1], (batch, q_len, w.groups, w.index_dim), dtype)
  k_pages = _random(keys[2], (num_pages, bk, w.groups, w.head_dim), dtype)
  v_pages = _random(keys[3], (num_pages, bk, w.groups, w.head_dim), dtype)
  index_pages = _random(keys[4], (num_pages, bk, w.index_dim), dtype)
  table = jax.random.permutation(keys[5], num_pages).reshape(batch, pages_per_seq)
  table = table.astype(jnp.int32)
  lengths = jnp.full((batch,), ctx, jnp.int32)
  step = lambda q, q_idx, k_pages, v_pages, index_pages: msa_jax.paged_msa_decode(
      q, q_idx, k_pages, v_pages, index_pages, table, lengths, block_size=bk, topk=w.topk,
      implementation=impl, interpret=interpret)
  steps = args.decode_loop_steps
  row = {"batch": batch, "context": ctx, "q_len": q_len, "loop_steps": steps}
  args_ = (q, q_idx, k_pages, v_pages, index_pages)
  call, loop = jax.jit(step), in_loop(step, steps)
  row["msa_ms"], _ = timed(lambda: block(call(*args_)), iters=args.iters,
                           budget_s=args.budget_s)
  ms, _ = timed(lambda: block(loop(*args_)), iters=args.iters, budget_s=args.budget_s)
  row["msa_loop_ms"] = ms / steps
  try:
    if q_len == 1 and jax.default_backend() == "gpu":
      from jax.experimental.pallas.ops.gpu import paged_attention as paged_ops
      kt, vt = (jnp.transpose(x, (2, 0, 1, 3)) for x in (k_pages, v_pages))
      # The kernel's default (8 pages of 128 tokens per block) exceeds shared memory at
      # these shapes: take the fastest block that compiles.
      best = None
      for pages in (4, 2, 1):
        f = functools.partial(paged_ops.paged_attention, pages_per_compute_block=pages)
        g = jax.jit(f)
        try:
          ms, _ = timed(lambda: block(g(q[:, 0], kt, vt, table, lengths)),
                        iters=args.iters, budget_s=args.budget_s)
        except Exception as e:
          row.setdefault("dense_tried", {})[pages] = f"{type(e).__name__}: {str(e)[:80]}"
          continue
        row.setdefault("dense_tried", {})[pages] = ms
        if best is None or ms < best[0]:
          best = (ms, f, pages)
      if best is None:
        raise RuntimeError(f"no paged_attention block compiled: {row['dense_tried']}")
      row["dense_pages_per_compute_block"] = best[2]
      dense = lambda q, kt, vt, f=best[1]: f(q[:, 0], kt, vt, table, lengths)[:, None]
      name = "dense_pallas_paged"
    else:
      kt, vt = k_pages, v_pages

      def dense(q, kt, vt):
        kc, vc = (msa_jax.paged.gather_pages(x, table, lengths) for x in (kt, vt))
        return jax.nn.dot_product_attention(q, kc, vc, is_causal=False)
      name = "dense_xla_gathered"
    call, loop = jax.jit(dense), in_loop(dense, steps)
    row[f"{name}_ms"], _ = timed(lambda: block(call(q, kt, vt)), iters=args.iters,
                                 budget_s=args.budget_s)
    ms, _ = timed(lambda: block(loop(q, kt, vt)), iters=args.iters, budget_s=args.budget_s)
    row[f"{name}_loop_ms"] = ms / steps
    row["dense_baseline"] = name
    row["speedup"] = row[f"{name}_ms"] / row["msa_ms"]
    row["speedup_loop"] = row[f"{name}_loop_ms"] / row["msa_loop_ms"]
  except Exception as e:  # e.g. the baseline's second copy of the cache does not fit
    row["dense_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  item = dtype.itemsize
  must_move = batch * (ctx * w.index_dim * item
                       + q_len * w.groups * w.topk * bk * 2 * w.head_dim * item
                       + 2 * q_len * w.q_heads * w.head_dim * item)
  row["tokens_per_s_loop"] = batch * q_len / (row["msa_loop_ms"] * 1e-3)
  row["achieved_tbps_loop"] = must_move / (row["msa_loop_ms"] * 1e-3) / 1e12
  return row


# ----------------------------------------------------------------------------- tuning


def tune(w: Workload, args, interpret):
  """``msa_jax.tuning.autotune.tune`` on the last ``--tune-chunk`` queries of a
  ``--tune-context``-token prefill (``--tune-grid``: only these sweeps); the winners become
  this card's tuning data (``msa_jax/tuning/data/<card>/``, and a copy under the output
  directory)."""
  from msa_jax.tuning import autotune
  grids = None
  if args.tune_grid:
    try:
      grids = autotune.check_grids(json.loads(args.tune_grid))
    except ValueError as e:
      raise SystemExit(f"--tune-grid: {e}") from None
  elif args.smoke:
    grids = autotune.SMOKE_GRIDS
  shape = {"context": args.tune_context, "chunk": min(args.tune_chunk, args.tune_context),
           "decode_context": args.tune_decode_context}
  return autotune.tune(w, context=args.tune_context, chunk=args.tune_chunk,
                       decode_context=args.tune_decode_context,
                       path_chunk=args.tune_path_chunk, grids=grids, iters=args.iters,
                       interpret=interpret, on_best=lambda best: _store_tuned(best, args, shape),
                       log=lambda line: print(line, flush=True))


def _store_tuned(best, args, shape):
  """Write ``best`` as this card's tuning data (``msa_jax/tuning/data/<card>/``; under
  ``--output-dir``/tuning with ``--smoke``), and a copy under ``--output-dir``/tuning."""
  from msa_jax import tuning
  from msa_jax.tuning import autotune
  copy = os.path.join(args.output_dir, "tuning")
  for data_dir in ([copy] if args.smoke else [tuning.DATA_DIR, copy]):
    tuning.save(tuning.device_kind(), best, data_dir=data_dir,
                shapes=autotune.section_shapes(**shape))


# ----------------------------------------------------------------------------- reporting


def _fmt(x, digits=3):
  if isinstance(x, float):
    return f"{x:.{digits}g}"
  return "-" if x is None else str(x)


def markdown(result) -> str:
  m = result["meta"]
  lines = [f"Card: {m['device']} · jax {m['jax']} · commit {m['commit']} · {m['date']} · "
           f"workload {m['workload']}",
           f"Ceilings: bf16 matmul {_fmt(result['ceilings']['matmul_tflops'])} TFLOP/s, "
           f"copy {_fmt(result['ceilings']['copy_tbps'])} TB/s"
           + (f", read {_fmt(result['ceilings']['read_tbps'])} TB/s"
              if result["ceilings"].get("read_tbps") else ""), ""]
  if len(result.get("parts", [])) > 1:  # merged from several processes (benchmark --merge)
    lines[-1:-1] = [f"Merged from {len(result['parts'])} processes, each with its baselines: "
                    + "; ".join(f"{p['file']} (commit {p['meta']['commit']}, "
                                f"{p['meta']['date']}, matmul "
                                f"{_fmt(p['ceilings']['matmul_tflops'])} TFLOP/s, copy "
                                f"{_fmt(p['ceilings']['copy_tbps'])} TB/s"
                                + (f", read {_fmt(p['ceilings']['read_tbps'])} TB/s"
                                   if p["ceilings"].get("read_tbps") else "") + ")"
                                for p in result["parts"])]
  if result["prefill"]:
    lines += ["| N | selection | union of 8 | chunk | index+top-k ms | sparse attn ms | "
              "MSA total ms | dense cuDNN ms | speedup | FLOP ratio | sparse TFLOP/s | "
              "sparse kernel TFLOP/s | index TFLOP/s | dense TFLOP/s | peak GB |",
              "|" + "---|" * 15]
    for r in result["prefill"]:
      if "error" in r:
        lines.append(f"| {r['N']} | error: {r['error'][:120]} |")
        continue
      lines.append("| " + " | ".join(_fmt(r.get(c)) for c in [
          "N", "selection", "union8", "chunk", "index_ms", "sparse_ms", "msa_ms", "dense_ms", "speedup", "flop_ratio",
          "sparse_tflops"]) + " | " + _fmt(kernel_tflops(r, m["workload"])) + " | "
          + " | ".join(_fmt(r.get(c)) for c in ["index_tflops", "dense_tflops"]) + " | "
          + _fmt(r["peak_bytes"] / 1e9 if r.get("peak_bytes", -1) > 0 else None) + " |")
    lines += ["", "sparse attn = schedule + kernel + combine over all chunks; sparse kernel = "
              "the kernel alone on the last chunk (its useful FLOPs over its time). "
              "selection: random index inputs, structured like a trained indexer's "
              "(msa_jax.workloads), or mixed (stretches of both); union of 8 = the mean number of distinct blocks that 8 "
              "consecutive queries select (16 when they agree, up to 128)."]
  if result["decode"]:
    lines += ["", "Decode, per call (host dispatch included) and per step inside one jitted loop "
              "(dispatch-free, as in a served model):", "",
              "| batch | context | q/seq | selection | MSA ms | index+top-k ms | "
              "sparse attn ms | dense XLA ms | dense Pallas gqa ms | speedup vs best | "
              "TB/s on bytes that must move | MSA ms, loop | dense best ms, loop | "
              "speedup, loop | TB/s, loop | x byte floor | x byte floor, loop |",
              "|" + "---|" * 17]
    for r in result["decode"]:
      if "error" in r:
        lines.append(f"| {r['batch']} | {r['context']} | {r['q_len']} | error: "
                     f"{r['error'][:120]} |")
        continue
      lines.append("| " + " | ".join(_fmt(r.get(c)) for c in [
          "batch", "context", "q_len", "selection", "msa_ms", "index_ms", "sparse_ms",
          "dense_xla_ms",
          "dense_pallas_gqa_ms", "speedup", "achieved_tbps", "msa_loop_ms", "dense_best_loop_ms",
          "speedup_loop", "achieved_tbps_loop", "x_floor", "x_floor_loop"]) + " |")
    lines += ["", "x byte floor: the step's time over its floor, the bytes that must move at "
              "the read ceiling above (a read-only stream in the same process)."]
  if result.get("paged_decode"):
    lines += ["", "Paged decode (one query per sequence, pages shuffled): per call and per step "
              "in a jitted loop:", "",
              "| batch | context | MSA ms | dense ms | speedup | MSA ms, loop | dense ms, loop | "
              "speedup, loop | tokens/s, loop | TB/s, loop |", "|" + "---|" * 10]
    for r in result["paged_decode"]:
      if "error" in r:
        lines.append(f"| {r['batch']} | {r['context']} | error: {r['error'][:120]} |")
        continue
      name = r.get("dense_baseline", "dense")
      lines.append("| " + " | ".join(_fmt(r.get(c)) for c in [
          "batch", "context", "msa_ms", f"{name}_ms", "speedup", "msa_loop_ms",
          f"{name}_loop_ms", "speedup_loop", "tokens_per_s_loop", "achieved_tbps_loop"]) + " |")
  return "\n".join(lines) + "\n"


def plot(result, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in result["prefill"] if "error" not in r]
  if not rows:
    return
  fig, ax = plt.subplots(figsize=(7, 5))
  dense = {r["N"]: r["dense_ms"] for r in rows if r.get("dense_ms")}
  if dense:
    ax.loglog(*zip(*sorted(dense.items())), "k-o", label="dense causal GQA (cuDNN)", base=2)
  # One line per selection (structured solid, random dashed); rows without one are random.
  selections = sorted({r.get("selection", "random") for r in rows}, reverse=True)
  for selection in selections:
    line = "-" if selection == "structured" else "--"
    suffix = f", {selection} selections" if len(selections) > 1 else ""
    for key, label, style in [("msa_ms", "MSA total", "C0s"),
                              ("index_ms", "MSA index + top-k", "C1^"),
                              ("sparse_ms", "MSA sparse attention", "C2v")]:
      pts = [(r["N"], r[key]) for r in rows
             if r.get(key) and r.get("selection", "random") == selection]
      if pts and not (key == "index_ms" and selection != selections[0]):
        # The index does not depend on the selection's structure: drawn once.
        ax.loglog(*zip(*pts), style + line, label=label + ("" if key == "index_ms" else suffix),
                  base=2, alpha=1.0 if selection == "structured" else 0.6)
  ax.set_xlabel("context length N (tokens)")
  ax.set_ylabel("prefill latency per layer (ms)")
  m = result["meta"]
  ax.set_title(f"MSA vs dense, {m['device']}, jax {m['jax']}, {m['commit']}, {m['date']}",
               fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def merge(paths, out_dir, tag):
  """One result from several invocations' JSON files: rows concatenated in order, meta and
  ceilings of the first on top and every part's own under "parts"."""
  parts = []
  for path in paths:
    with open(path) as f:
      parts.append(json.load(f))
  result = {"meta": parts[0]["meta"], "ceilings": parts[0]["ceilings"],
            "parts": [{"file": os.path.basename(p), "meta": r["meta"], "ceilings": r["ceilings"]}
                      for p, r in zip(paths, parts)]}
  for key in ("prefill", "decode", "paged_decode"):
    rows = [row for r in parts for row in r.get(key, [])]
    if rows or key != "paged_decode":
      result[key] = rows
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, tag)
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown(result))
  plot(result, stem + ".png")
  print(markdown(result))
  return result


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=cli.HelpFormatter)
  parser.add_argument("--sizes", type=int, nargs="+",
                      default=[8192, 32768, 131072, 262144, 524288, 1048576],
                      help="prefill context lengths N")
  parser.add_argument("--chunk", type=int, default=65536,
                      help="prefill query chunk for N above it (chunked prefill)")
  parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 32],
                      help="decode batch sizes")
  parser.add_argument("--decode-contexts", type=int, nargs="+",
                      default=[32768, 131072, 524288, 1048576],
                      help="decode cache lengths")
  parser.add_argument("--decode-queries", type=int, nargs="+", default=[1, 8],
                      help="query tokens per sequence per decode step")
  parser.add_argument("--decode-loop-steps", type=int, default=20,
                      help="decode steps per jitted loop for the per-step (dispatch-free) "
                           "timing")
  parser.add_argument("--max-decode-tokens", type=int, default=32 << 20,
                      help="skip decode cases with batch x context above this")
  parser.add_argument("--iters", type=int, default=10, help="timed calls per measurement (max)")
  parser.add_argument("--budget-s", type=float, default=10.0,
                      help="time budget of the timed calls of one MSA measurement")
  parser.add_argument("--dense-budget-s", type=float, default=60.0,
                      help="time budget of the timed dense calls (slow ones are timed once)")
  parser.add_argument("--tune", action="store_true",
                      help="first sweep the GPU kernels' launch parameters and store the best "
                           "as this card's data in msa_jax/tuning/data/<card>/")
  parser.add_argument("--tune-grid", default=None,
                      help='JSON: sweep only these kernels over these values, e.g. '
                           '\'{"sparse": {"kernel": ["triton", "mosaic"], "tile_rows": [64]}}\' '
                           '(give every key of that kernel: missing keys take the built-in '
                           'defaults)')
  parser.add_argument("--tune-context", type=int, default=131072,
                      help="context of the --tune prefill workload")
  parser.add_argument("--tune-chunk", type=int, default=16384,
                      help="queries of the --tune kernel sweeps (the last chunk of --tune-context)")
  parser.add_argument("--tune-path-chunk", type=int, default=65536,
                      help="queries of the sparse-path sweep (query_chunk)")
  parser.add_argument("--tune-decode-context", type=int, default=1048576,
                      help="cached tokens of the decode step the index_decode sweep times")
  parser.add_argument("--index-score-dtype", default=None, choices=["float8_e4m3fn"],
                      help="score the index in this precision (msa_jax.index_topk's "
                           "score_dtype; default: the inputs' bf16)")
  parser.add_argument("--selections", nargs="+", choices=SELECTIONS,
                      default=["random", "structured"],
                      help="index inputs of each row: random, and/or structured like a "
                           "trained indexer's selections (sink, recent and shared content "
                           "blocks; msa_jax.workloads), and/or mixed (stretches of both)")
  parser.add_argument("--skip-prefill", action="store_true", help="no prefill rows")
  parser.add_argument("--skip-decode", action="store_true", help="no decode rows")
  parser.add_argument("--paged", action="store_true",
                      help="also time decode on a paged cache (paged_msa_decode vs dense paged "
                           "attention) at the decode batches and contexts")
  parser.add_argument("--max-paged-tokens", type=int, default=8 << 20,
                      help="skip paged decode cases with batch x context above this (the dense "
                           "baseline holds a second copy of the cache)")
  parser.add_argument("--implementation", default=None, choices=msa_jax.IMPLEMENTATIONS,
                      help="MSA implementation (default: the backend's best)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes on CPU: xla + interpreted Pallas kernels (tests the "
                           "script, not the speed)")
  parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                      help="instead of timing: merge the results of several invocations "
                           "(e.g. prefill and decode run as two processes under a per-call "
                           "time limit, each with its baselines) into one JSON/MD/PNG")
  parser.add_argument("--output-dir", default=None,
                      help="where the JSON/MD/PNG go (default: benchmarks/results/<card>)")
  parser.add_argument("--tag", default=None, help="file name stem (default: kernels)")
  return parser


def main(argv=None):
  args = build_parser().parse_args(argv)
  args.output_dir = args.output_dir or cli.results_dir()
  if args.merge:
    merge(args.merge, args.output_dir, args.tag or "merged")
    return 0
  workload, interpret, impl = M3, False, args.implementation
  if args.smoke:
    workload, interpret = SMOKE, True
    impl = impl or "pallas_gpu"
    _shrink_for_smoke(args)
  workload = dataclasses.replace(workload, index_score_dtype=args.index_score_dtype)
  device = jax.devices()[0]
  meta = {"device": getattr(device, "device_kind", str(device)), "jax": jax.__version__,
          "commit": cli.commit(), "date": datetime.date.today().isoformat(),
          "backend": jax.default_backend(), "implementation": impl or "default",
          "workload": dataclasses.asdict(workload), "smoke": args.smoke}
  print(json.dumps(meta), flush=True)
  result = {"meta": meta, "ceilings": ceilings(args, small=args.smoke), "prefill": [],
            "decode": []}
  print(json.dumps(result["ceilings"]), flush=True)
  os.makedirs(args.output_dir, exist_ok=True)
  if args.tune:
    result["tuning"] = tune(workload, args, interpret)
  stem = os.path.join(args.output_dir, args.tag or ("smoke" if args.smoke else "kernels"))

  def add(table, row):  # print and save after every row: a later failure loses nothing
    result.setdefault(table, []).append(row)
    print(json.dumps(row), flush=True)
    with open(stem + ".json", "w") as f:
      json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
      f.write(markdown(result))

  _run_rows(args, workload, impl, interpret, result["ceilings"], add)
  plot(result, stem + ".png")
  print(markdown(result))
  return 0


def _shrink_for_smoke(args):
  """--smoke: tiny sizes everywhere (the script's paths, not its speed)."""
  args.sizes = [s for s in args.sizes if s <= 512] or [128, 256]
  args.chunk = min(args.chunk, 128)
  args.decode_batches, args.decode_contexts = [1, 2], [96]
  args.decode_queries = sorted({min(q, 4) for q in args.decode_queries})
  args.iters = min(args.iters, 2)
  args.decode_loop_steps = 2
  args.tune_context, args.tune_chunk, args.tune_decode_context = 256, 64, 256
  args.tune_path_chunk = 64


def _run_rows(args, workload, impl, interpret, ceilings_, add):
  """Every prefill, decode and paged-decode row the command line asks for, each passed to
  ``add(table, row)``; a row that fails is recorded with its error and the run goes on."""
  failed = lambda e, **key: {**key, "error": f"{type(e).__name__}: {str(e)[:500]}"}
  dense = {}  # dense baselines, timed once per shape for all selections
  for n in ([] if args.skip_prefill else args.sizes):
    for selection in args.selections:
      try:
        row = prefill_row(n, workload, args, impl, interpret, selection, dense)
      except Exception as e:  # pylint: disable=broad-except
        row = failed(e, N=n, selection=selection)
      add("prefill", row)
  for batch, ctx in itertools.product(args.decode_batches, args.decode_contexts):
    if args.skip_decode or batch * ctx > args.max_decode_tokens:
      continue
    for q_len, selection in itertools.product(args.decode_queries, args.selections):
      try:
        row = add_byte_floor(decode_row(batch, ctx, q_len, workload, args, impl, interpret,
                                        selection, dense), ceilings_)
      except Exception as e:  # pylint: disable=broad-except
        row = failed(e, batch=batch, context=ctx, q_len=q_len, selection=selection)
      add("decode", row)
  for batch, ctx in itertools.product(args.decode_batches, args.decode_contexts):
    if not args.paged or batch * ctx > args.max_paged_tokens:
      continue
    try:
      row = paged_decode_row(batch, ctx, 1, workload, args, impl, interpret)
    except Exception as e:  # pylint: disable=broad-except
      row = failed(e, batch=batch, context=ctx)
    add("paged_decode", row)


run = cli.console_command(main)


if __name__ == "__main__":
  run()
