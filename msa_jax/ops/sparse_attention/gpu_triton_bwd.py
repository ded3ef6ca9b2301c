"""Backward of block-sparse attention for GPUs (Pallas, Triton lowering).

Given the forward's ``out`` and ``lse`` and the cotangents ``d_out`` (and optionally
``d_lse``), recompute each selected (query, block) pair's probabilities
``p = exp(scale * q.k - lse)`` on the block's visible keys and form
``ds = p * (d_out.v - Delta)`` with ``Delta = rowsum(d_out * out) - d_lse`` (docs/msa.md §6,
backward). Three Pallas calls:

* **dQ, query-outer.** Grid ``(B, T / P, G)``: one program takes ``P`` query positions of one
  group, i.e. ``P x Hq/G`` rows (``P = max(1, 16 // (Hq/G))``: 16 rows, Triton's smallest
  GEMM M; ``P = 1`` at M3 shapes, 16 heads per group). For each position it walks that
  position's valid selected blocks (compacted to a prefix beforehand, so ``-1`` slots and
  repeated ids cost nothing) and accumulates ``dq += scale * ds k`` in float32 registers; with
  ``P > 1`` the rows of the other positions are masked out of each block's product. Every
  dq row is written once, no partials.
* **dK/dV, KV-outer** over the inverse map of ``schedule.build_schedule``, with work items of
  ``queries_per_item * tiles_per_item`` entries. One program per item loads its K/V block once
  and walks the item's entries in tiles of ``queries_per_item`` positions x ``Hq/G`` heads
  (the forward's tile), gathering q, d_out, lse and Delta rows, and accumulates
  ``dv += p^T d_out`` and ``dk += scale * ds^T q`` over all of the group's query heads in
  float32 registers (per-query-head dK/dV never exist). It writes one float32 partial
  ``[Bk, D]`` / ``[Bk, Dv]`` per item.
* **Reduce.** Grid ``(B, num_blocks, G)``: one program per (sequence, KV block, group) list
  sums its items' partials (the items of a list are contiguous) in a fixed order and writes
  the block's dK/dV in the input dtype; a block nobody selected has no items and gets exactly
  zero.

Why partials and a reduce rather than one program per list: the lists are very uneven. The
first block and the most recent ones are selected by nearly every query, so a program that
walks a whole list would do up to ``T`` entries' work on one SM (the average list holds
``T x k / num_blocks``) while the others idle. Cutting lists into items of at most
``queries_per_item * tiles_per_item`` entries bounds every program's work and spreads hot
blocks over many SMs; each item still amortises one K/V load over ``tiles_per_item`` tiles.
The cost is the float32 partial buffer, ``max_items x Bk x (D + Dv) x 4`` bytes with
``max_items ~ B*T*G*k / (queries_per_item * tiles_per_item) + B*G*num_blocks``, written once
and read once by the reduce. No atomics (XLA's scatter-add, i.e. ``segment_sum``, uses them
on GPU): the sum order is fixed, so the gradients are deterministic. ``tiles_per_item``
trades partial memory against parallelism.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from msa_jax import reference
from msa_jax.ops.sparse_attention import backward
from msa_jax import schedule as sched
from msa_jax.ops.common import smem
from msa_jax import tuning

MIN_ROWS = 16  # the smallest GEMM M dimension Triton lowers
# Tile rows in interpret mode, as paths.INTERPRET_TILE_ROWS (CPU cost grows with the row gathers).
INTERPRET_TILE_ROWS = 32


def _smem_limit() -> int:
  """The first GPU's shared memory per block (Hopper's where none is visible: lowering)."""
  try:
    return smem.limit()
  except RuntimeError:
    return smem.HOPPER


def dkv_tile_rows(d: int, dv: int, block_size: int, dtype, heads: int, table_rows: int,
                  limit: int) -> int:
  """Query rows of a dK/dV tile: the table's, halved until the kernel fits ``limit`` bytes
  of shared memory (float32 needs half the rows of bf16). Raises ``ValueError`` when even
  the smallest tile does not fit."""
  itemsize = jnp.dtype(dtype).itemsize
  fits = lambda r: smem.dkv_bytes(r, d, dv, block_size, itemsize) <= limit
  rows = smem.fit_rows(table_rows, fits, max(MIN_ROWS, heads))
  if not fits(rows):
    raise ValueError(
        f"the GPU backward needs {smem.dkv_bytes(rows, d, dv, block_size, itemsize)} bytes "
        f"of shared memory for a {block_size}-key block at head dims {d}/{dv} in "
        f"{jnp.dtype(dtype).name} (the GPU has {limit}); use bfloat16 inputs or "
        f"implementation='xla'")
  return rows


def _dot(a, b, contract_b):
  """a @ b (contract_b=0) or a @ b.T (contract_b=1) with fp32 accumulation."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a.T @ b with fp32 accumulation."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _probs_and_dlogits(q, do, lse, delta, row_pos, visible_rows, k, v, blk, kv_len, *,
                       block_size, scale):
  """p and ds = p * (do.v - Delta) of ``rows`` query rows against one key block [rows, Bk]."""
  s = _dot(q, k, 1) * scale
  key_pos = blk * block_size + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
  visible = (key_pos <= row_pos[:, None]) & (key_pos < kv_len)
  if visible_rows is not None:
    visible = visible & visible_rows[:, None]
  # lse is +inf for rows without a visible key, so p = 0 there even before the mask.
  p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
  dp = _dot(do, v, 1)
  return p, p * (dp - delta[:, None])


# ----------------------------------------------------------------------------- dQ


def _dq_kernel(ids_ref, counts_ref, pos_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, positions, heads, topk, block_size, scale, q_len, groups):
  b, i, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = positions * heads
  q = q_ref[...].reshape(rows, q_ref.shape[-1])
  do = do_ref[...].reshape(rows, do_ref.shape[-1])
  lse = lse_ref[...].reshape(rows)
  delta = delta_ref[...].reshape(rows)
  pos = pos_ref[b, pl.ds(i * positions, positions)]
  row_pos = jnp.broadcast_to(pos[:, None], (positions, heads)).reshape(rows)
  row_owner = lax.broadcasted_iota(jnp.int32, (positions, heads), 0).reshape(rows)
  kv_len = kv_len_ref[b]

  def position(n, dq):
    query = (b * q_len + i * positions + n) * groups + g
    mine = (row_owner == n) if positions > 1 else None

    def block(j, dq):
      blk = ids_ref[query * topk + j]
      keys = pl.ds(blk * block_size, block_size)
      k = k_ref[b, keys, g, :]
      v = v_ref[b, keys, g, :]
      _, ds = _probs_and_dlogits(q, do, lse, delta, row_pos, mine, k, v, blk, kv_len,
                                 block_size=block_size, scale=scale)
      return dq + _dot(ds.astype(k.dtype), k, 0)

    return lax.fori_loop(0, counts_ref[query], block, dq)

  dq = jnp.zeros((rows, q_ref.shape[-1]), jnp.float32)
  dq = lax.fori_loop(0, positions, position, dq)
  dq_ref[...] = (dq * scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dq(q, k, v, d_out, lse, delta, block_indices, valid, q_positions, kv_lengths, *,
        block_size, scale, cfg, interpret):
  b, t, hq, d = q.shape
  g = k.shape[2]
  heads = hq // g
  topk = block_indices.shape[-1]
  positions = max(1, MIN_ROWS // heads)
  tp = reference.cdiv(t, positions) * positions

  def pad_t(x, value=0):
    return reference._pad_axis(x, 1, tp, value)

  # Valid slots first (stable), so each position loops over exactly its count of blocks.
  order = jnp.argsort(~valid, axis=-1, stable=True)
  ids = jnp.take_along_axis(jnp.where(valid, block_indices, 0), order, axis=-1)
  counts = jnp.sum(valid, axis=-1, dtype=jnp.int32)
  ids = pad_t(ids).astype(jnp.int32).reshape(-1)
  counts = pad_t(counts).reshape(-1)
  pos = pad_t(q_positions, -1)
  grouped = lambda x: pad_t(x).reshape(b, tp, g, heads, *x.shape[3:])
  kernel = functools.partial(_dq_kernel, positions=positions, heads=heads, topk=topk,
                             block_size=block_size, scale=scale, q_len=tp, groups=g)
  whole = pl.BlockSpec()
  rows_spec = lambda *tail: pl.BlockSpec((None, positions, None, heads, *tail),
                                         lambda bi, i, gi: (bi, i, gi, 0, *(0,) * len(tail)))
  dq = pl.pallas_call(
      kernel,
      grid=(b, tp // positions, g),
      in_specs=[whole, whole, whole, whole, rows_spec(d), whole, whole,
                rows_spec(d_out.shape[-1]), rows_spec(), rows_spec()],
      out_specs=rows_spec(d),
      out_shape=jax.ShapeDtypeStruct((b, tp, g, heads, d), q.dtype),
      compiler_params=pltr.CompilerParams(num_warps=cfg.dq_num_warps,
                                          num_stages=cfg.dq_num_stages),
      interpret=interpret,
      name="msa_sparse_attention_bwd_dq",
  )(ids, counts, pos, kv_lengths, grouped(q), k, v, grouped(d_out), grouped(lse),
    grouped(delta))
  return dq[:, :t].reshape(b, t, hq, d)


# ----------------------------------------------------------------------------- dK / dV


def _dkv_kernel(items_ref, q_rows_ref, pos_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, queries_per_item, heads, block_size,
                scale):
  b, g, blk, start, count = sched.read_item(items_ref, pl.program_id(0))

  # Items past the schedule's end (count 0) write nothing: the reduce never reads them.
  @pl.when(count > 0)
  def _():
    keys = pl.ds(blk * block_size, block_size)
    k = k_ref[b, keys, g, :]
    v = v_ref[b, keys, g, :]
    kv_len = kv_len_ref[b]
    rows = queries_per_item * heads
    lane = lax.broadcasted_iota(jnp.int32, (queries_per_item,), 0)

    def tile(j, carry):
      dk, dv = carry
      first = j * queries_per_item
      live = first + lane < count
      entries = pl.ds(start + first, queries_per_item)
      # Lanes past the count read query row 0 with position -1: nothing visible, p = 0.
      q_rows = jnp.where(live, q_rows_ref[entries], 0)
      pos = jnp.where(live, pos_ref[entries], -1)
      q = q_ref[q_rows].reshape(rows, q_ref.shape[-1])
      do = do_ref[q_rows].reshape(rows, do_ref.shape[-1])
      lse = lse_ref[q_rows].reshape(rows)
      delta = delta_ref[q_rows].reshape(rows)
      row_pos = jnp.broadcast_to(pos[:, None], (queries_per_item, heads)).reshape(rows)
      p, ds = _probs_and_dlogits(q, do, lse, delta, row_pos, None, k, v, blk, kv_len,
                                 block_size=block_size, scale=scale)
      dv = dv + _dot_tn(p.astype(do.dtype), do)
      dk = dk + _dot_tn(ds.astype(q.dtype), q)
      return dk, dv

    init = (jnp.zeros((block_size, k.shape[-1]), jnp.float32),
            jnp.zeros((block_size, v.shape[-1]), jnp.float32))
    dk, dv = lax.fori_loop(0, (count + queries_per_item - 1) // queries_per_item, tile, init)
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _reduce_kernel(first_ref, num_ref, dk_part_ref, dv_part_ref, dk_ref, dv_ref, *, num_blocks,
                   groups):
  b, blk, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  owner = (b * groups + g) * num_blocks + blk
  first = first_ref[owner]

  def add(n, carry):
    dk, dv = carry
    return dk + dk_part_ref[first + n], dv + dv_part_ref[first + n]

  init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, num_ref[owner], add, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv(q, k, v, d_out, lse, delta, block_indices, valid, q_positions, kv_lengths, *,
         block_size, scale, queries_per_item, tiles_per_item, cfg, interpret):
  b, t, hq, d = q.shape
  s_pad, g = k.shape[1], k.shape[2]
  dv_dim = v.shape[-1]
  heads = hq // g
  nb = s_pad // block_size
  schedule = sched.build_schedule(block_indices, valid, q_positions, nb,
                                  queries_per_item * tiles_per_item)
  max_items = schedule.max_items
  kernel = functools.partial(_dkv_kernel, queries_per_item=queries_per_item, heads=heads,
                             block_size=block_size, scale=scale)
  whole = pl.BlockSpec()
  part_spec = lambda dim: pl.BlockSpec((None, block_size, dim), lambda i: (i, 0, 0))
  by_row = lambda x: x.reshape(b * t * g, heads, *x.shape[3:])
  dk_part, dv_part = pl.pallas_call(
      kernel,
      grid=(max_items,),
      in_specs=[whole] * 10,
      out_specs=[part_spec(d), part_spec(dv_dim)],
      out_shape=(jax.ShapeDtypeStruct((max_items, block_size, d), jnp.float32),
                 jax.ShapeDtypeStruct((max_items, block_size, dv_dim), jnp.float32)),
      compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps,
                                          num_stages=cfg.num_stages),
      interpret=interpret,
      name="msa_sparse_attention_bwd_dkv",
  )(schedule.items.reshape(-1), schedule.q_rows, schedule.positions, kv_lengths, by_row(q), k,
    v, by_row(d_out), by_row(lse), by_row(delta))

  # The items of one (batch, group, block) list are contiguous and in list order.
  items = schedule.items
  num_lists = b * g * nb
  owner = (items[:, sched.ITEM_BATCH] * g + items[:, sched.ITEM_GROUP]) * nb \
      + items[:, sched.ITEM_BLOCK]
  owner = jnp.where(items[:, sched.ITEM_COUNT] > 0, owner, num_lists)
  lists = jnp.arange(num_lists, dtype=jnp.int32)
  first = jnp.searchsorted(owner, lists, side="left").astype(jnp.int32)
  num = jnp.searchsorted(owner, lists, side="right").astype(jnp.int32) - first

  kernel = functools.partial(_reduce_kernel, num_blocks=nb, groups=g)
  block_spec = lambda dim: pl.BlockSpec((None, block_size, None, dim),
                                        lambda bi, j, gi: (bi, j, gi, 0))
  return pl.pallas_call(
      kernel,
      grid=(b, nb, g),
      in_specs=[whole] * 4,
      out_specs=[block_spec(d), block_spec(dv_dim)],
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      compiler_params=pltr.CompilerParams(num_warps=cfg.reduce_num_warps, num_stages=1),
      interpret=interpret,
      name="msa_sparse_attention_bwd_reduce",
  )(first, num, dk_part, dv_part)


# ----------------------------------------------------------------------------- entry point


def sparse_attention_bwd(q, k, v, block_indices, q_positions, kv_lengths, out, lse, d_out,
                         d_lse=None, *, block_size, scale, interpret=False, queries_per_item=None,
                         tiles_per_item=None, num_warps=None, num_stages=None,
                         dq_num_warps=None, dq_num_stages=None, reduce_num_warps=None):
  """Gradients of ``reference.sparse_attention``'s output with respect to q, k, v (arguments
  and returns: ``ops/sparse_attention/backward.py``).

  GPU-only arguments:
    interpret: run the kernels in Pallas interpret mode.
    queries_per_item: query positions per KV-outer tile (rows = this x Hq/G); default
      ``tile_rows // (Hq/G)`` of the tuning table (``INTERPRET_TILE_ROWS`` in interpret mode).
    tiles_per_item, num_warps, num_stages, dq_num_warps, dq_num_stages, reduce_num_warps:
      launch parameters; None takes the per-card table (``msa_jax.tuning``, "sparse_bwd").
  """
  cfg = tuning.config("sparse_bwd", shape=tuning.shape(k.shape[1], q.shape[1]),
                      tiles_per_item=tiles_per_item, num_warps=num_warps,
                      num_stages=num_stages, dq_num_warps=dq_num_warps,
                      dq_num_stages=dq_num_stages, reduce_num_warps=reduce_num_warps)
  b, t, hq, _ = q.shape
  s_len, g = k.shape[1], k.shape[2]
  heads = hq // g
  if queries_per_item is None:
    rows = (INTERPRET_TILE_ROWS if interpret else
            dkv_tile_rows(q.shape[-1], v.shape[-1], block_size, q.dtype, heads,
                          cfg.tile_rows, _smem_limit()))
    queries_per_item = max(1, rows // heads)
  if not interpret:
    # Triton's dots need >= 16 rows; smaller ones silently go wrong in bf16.
    queries_per_item = max(queries_per_item, reference.cdiv(MIN_ROWS, heads))
  nb = reference.cdiv(s_len, block_size)
  pad = nb * block_size - s_len
  kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
  vp = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  x = backward.prepare(q, block_indices, q_positions, kv_lengths, out, lse, d_out, d_lse, nb)
  args = (q, kp, vp, x.d_out, x.lse, x.delta, x.block_indices, x.valid, x.q_positions,
          x.kv_lengths)
  dq = _dq(*args, block_size=block_size, scale=scale, cfg=cfg, interpret=interpret)
  dk, dv = _dkv(*args, block_size=block_size, scale=scale, queries_per_item=queries_per_item,
                tiles_per_item=cfg.tiles_per_item, cfg=cfg, interpret=interpret)
  return dq, dk[:, :s_len], dv[:, :s_len]
