"""Sparse decode, GPUs (Pallas, Triton lowering): query-outer split-K over selected pages.

With 1-16 query tokens per sequence there is nothing to share across queries, so the KV-outer
inversion buys nothing: each program takes one (sequence, query token, group) and a
contiguous share of its selected blocks (split-K, flash-decoding style), maps each block id
to its page through ``page_table[b, block]``, loads that page's ``[Bk, D]`` keys and values of
the group, and keeps an online softmax for the group's query heads (padded to the 16-row GEMM
minimum). Each program compacts its row of the selection itself (valid ids, in range and
first occurrence, in their order: a [k, k] comparison in registers) and loops only over its
share of the live ones: short sequences and idle rows read nothing. Each program writes one
float32 partial output and LSE; a second small kernel merges the splits
(``paged_sparse_decode``). Splits are sized so the grid fills the GPU even at batch 1. A
decode step is then two launches here, none in XLA around them.

The contiguous decode of ``msa_attention`` runs this kernel too, on the cache seen as pages
of one block each (``page_table=None``: page ``b * num_blocks + j`` is block j of sequence b,
a reshape).

Keys at or past ``kv_lengths[b]`` are masked in the logits and their values zeroed before the
``P @ V`` product, so stale or poisoned page contents (NaN, inf) never reach an output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from msa_jax import schedule
from msa_jax import tuning

MIN_ROWS = 16  # the smallest GEMM M dimension Triton lowers
TARGET_PROGRAMS = 264  # two waves of an H100/H200's 132 SMs
COMBINE_COLUMNS = 32  # Dv columns per program of the combine kernel
COMBINE_MAX_SPLITS = 16  # splits one combine program merges (sparse decode: at most topk)
MAX_KERNEL_COMPACT = 64  # longest selection row a program compacts itself ([k, k] compares)


def _kernel(ids_ref, count_ref, pos_ref, kv_len_ref, table_ref, q_ref, k_ref, v_ref, o_ref,
            lse_ref, *, block_size, num_blocks, slots_per_split, scale, paged, compacted):
  b, t, g, split = (pl.program_id(i) for i in range(4))
  p = pos_ref[b, t]
  kv_len = kv_len_ref[b]
  first = split * slots_per_split
  if compacted:  # the caller's count_ref valid ids come first
    n = jnp.clip(count_ref[b, t, g] - first, 0, slots_per_split)
    block_at = lambda j: ids_ref[b, t, g, first + j]
  else:  # the row compacted here: valid ids (in range, first occurrence) keep their order
    ids = ids_ref[b, t, g, :]
    width = ids.shape[0]
    earlier = (lax.broadcasted_iota(jnp.int32, (width, width), 1)
               < lax.broadcasted_iota(jnp.int32, (width, width), 0))  # [slot, earlier slot]
    repeat = jnp.max(jnp.where(earlier & (ids[None, :] == ids[:, None]), 1, 0), axis=1) > 0
    valid = (ids >= 0) & (ids < num_blocks) & ~repeat
    slot = jnp.sum(jnp.where(earlier & valid[None, :], 1, 0), axis=1)  # valid ids before it
    slot = jnp.where(valid, slot, width)
    n = jnp.clip(jnp.sum(valid.astype(jnp.int32)) - first, 0, slots_per_split)
    block_at = lambda j: jnp.sum(jnp.where(slot == first + j, ids, 0))
  q = q_ref[...]  # [rows, D]
  rows = q.shape[0]
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  key_row = lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
  key_col = lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)

  def body(j, carry):
    m, l, acc = carry
    blk = block_at(j)
    page = table_ref[b, blk] if paged else b * num_blocks + blk
    keys = pl.ds(0, block_size)
    k = k_ref[page, keys, g, :]
    v = v_ref[page, keys, g, :]
    first_key = blk * block_size
    visible = (first_key + key_row <= p) & (first_key + key_row < kv_len)  # [1, Bk]
    visible_col = (first_key + key_col <= p) & (first_key + key_col < kv_len)  # [Bk, 1]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * scale
    s = jnp.where(visible, s, -jnp.inf)
    # Stale tokens of the page may hold anything: 0 * NaN would leak through P @ V.
    v = jnp.where(visible_col, v, jnp.zeros((), v.dtype))
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    e = jnp.exp(s - m_safe[:, None])
    l = l * alpha + jnp.sum(e, axis=1)
    acc = acc * alpha[:, None] + lax.dot_general(
        e.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32)
    return m_new, l, acc

  init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows, o_ref.shape[-1]), jnp.float32))
  m, l, acc = lax.fori_loop(0, n, body, init)
  has_keys = l != 0  # NaN (a visible NaN/Inf logit) is not "no keys"
  o_ref[...] = acc / jnp.where(has_keys, l, 1.0)[:, None]
  lse_ref[...] = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), -jnp.inf)


def paged_sparse_decode_partials(q, k_pages, v_pages, page_table, block_indices, q_positions,
                                 kv_lengths, *, block_size, scale, counts=None, num_splits=None,
                                 num_warps=None, num_stages=None, interpret=False):
  """Returns partial_out f32 [splits,B,T,Hq,Dv], partial_lse f32 [splits,B,T,Hq].

  ``block_indices [B,T,G,k]``: the selection as ``sparse_attention`` takes it (-1, repeats
  and ids past the table count as no block), compacted by the kernel (rows longer than
  ``MAX_KERNEL_COMPACT`` in XLA first); or, with ``counts [B,T,G]``, already compacted: the
  first ``counts`` ids valid and distinct (``schedule.compact_selection``; any k). ``page_table
  [B, max_pages]``, or None for a contiguous cache seen as pages of one block each
  (``k_pages`` ``[B * num_blocks, Bk, G, D]``). Every partial slot is written (LSE -inf and
  out 0 for a split with nothing to do).
  """
  partial_out, partial_lse = _partials(
      q, k_pages, v_pages, page_table, block_indices, q_positions, kv_lengths,
      block_size=block_size, scale=scale, counts=counts, num_splits=num_splits,
      num_warps=num_warps, num_stages=num_stages, interpret=interpret)
  return _unpadded(partial_out, partial_lse, q.shape[2])


def _unpadded(partial_out, partial_lse, hq):
  """Padded partials ([splits,B,T,G,rows,...]) -> [splits,B,T,Hq,...]."""
  num_splits, b, t, g, _, dv = partial_out.shape
  return (partial_out[..., :hq // g, :].reshape(num_splits, b, t, hq, dv),
          partial_lse[..., :hq // g].reshape(num_splits, b, t, hq))


def paged_sparse_decode(q, k_pages, v_pages, page_table, block_indices, q_positions,
                        kv_lengths, *, block_size, scale, counts=None, num_splits=None,
                        interpret=False):
  """The decode output (out [B,T,Hq,Dv] in q's dtype, lse f32 [B,T,Hq]): the split-K
  partials merged by a second small kernel (``_combine_kernel``), in two launches.

  Same arguments as ``paged_sparse_decode_partials``; equal to ``schedule.combine`` of its
  partials (queries with no visible key: out 0, LSE -inf; a NaN partial makes its query NaN).
  """
  partial_out, partial_lse = _partials(
      q, k_pages, v_pages, page_table, block_indices, q_positions, kv_lengths,
      block_size=block_size, scale=scale, counts=counts, num_splits=num_splits,
      interpret=interpret)
  num_splits, b, t, g, rows, dv = partial_out.shape
  heads, hq = q.shape[2] // g, q.shape[2]
  piece = min(dv, COMBINE_COLUMNS)
  if not (_power_of_2(num_splits) and num_splits <= COMBINE_MAX_SPLITS
          and _power_of_2(piece) and dv % piece == 0):
    # Triton tiles are powers of two, and a program holds all splits of its piece: other
    # partials (e.g. full attention's, split over every block) merge in XLA instead.
    return schedule.combine(*_unpadded(partial_out, partial_lse, hq),
                            jnp.ones((b, t, g, num_splits), bool), q.dtype)
  out, lse = pl.pallas_call(
      _combine_kernel,
      grid=(b, t, g, dv // piece),
      in_specs=[
          pl.BlockSpec((num_splits, None, None, None, rows, piece),
                       lambda bi, ti, gi, ci: (0, bi, ti, gi, 0, ci)),
          pl.BlockSpec((num_splits, None, None, None, rows),
                       lambda bi, ti, gi, ci: (0, bi, ti, gi, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, piece), lambda bi, ti, gi, ci: (bi, ti, gi, 0, ci)),
          pl.BlockSpec((None, None, None, rows), lambda bi, ti, gi, ci: (bi, ti, gi, 0)),
      ],
      out_shape=(jax.ShapeDtypeStruct((b, t, g, rows, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, t, g, rows), jnp.float32)),
      compiler_params=pltr.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="msa_paged_sparse_decode_combine",
  )(partial_out, partial_lse)
  return (out[..., :heads, :].reshape(b, t, hq, dv), lse[..., :heads].reshape(b, t, hq))


def _power_of_2(n: int) -> bool:
  return n & (n - 1) == 0


def _combine_kernel(o_ref, lse_ref, out_ref, out_lse_ref):
  """One (sequence, query, group) and a piece of Dv: the splits' partials merged by LSE."""
  lse = lse_ref[...]  # [splits, rows]
  m = jnp.max(lse, axis=0)
  m_safe = jnp.where((m > -jnp.inf) & (m < jnp.inf), m, 0.0)
  w = jnp.exp(lse - m_safe[None, :])
  total = jnp.sum(w, axis=0)
  has = total != 0  # a NaN partial makes the query NaN (out and LSE), never "no keys"
  w = w / jnp.where(has, total, 1.0)[None, :]
  out_ref[...] = jnp.sum(w[:, :, None] * o_ref[...], axis=0).astype(out_ref.dtype)
  out_lse_ref[...] = jnp.where(has, m_safe + jnp.log(jnp.where(has, total, 1.0)), -jnp.inf)


def _partials(q, k_pages, v_pages, page_table, block_indices, q_positions, kv_lengths, *,
              block_size, scale, counts=None, num_splits=None, num_warps=None,
              num_stages=None, interpret=False):
  """Padded partials: out f32 [splits,B,T,G,rows,Dv], lse f32 [splits,B,T,G,rows]."""
  pages_per_row = (k_pages.shape[0] // q.shape[0] if page_table is None else
                   page_table.shape[1])
  cfg = tuning.config("decode", shape=tuning.shape(pages_per_row * block_size, q.shape[1]),
                      num_warps=num_warps, num_stages=num_stages)
  b, t, hq, d = q.shape
  num_pages, _, g, dv = v_pages.shape
  heads = hq // g
  rows = max(MIN_ROWS, pl.next_power_of_2(heads))
  topk = block_indices.shape[-1]
  if num_splits is None:
    num_splits = max(1, min(topk, TARGET_PROGRAMS // (b * t * g)))
  slots_per_split = -(-topk // num_splits)
  num_splits = -(-topk // slots_per_split)
  if counts is None and topk > MAX_KERNEL_COMPACT:
    block_indices, counts = schedule.compact_selection(
        block_indices, page_table.shape[1] if page_table is not None else num_pages // b)
  compacted = counts is not None
  # Triton tiles are powers of two: the kernel loads a compacting row whole.
  width = num_splits * slots_per_split if compacted else max(2, pl.next_power_of_2(topk))
  ids = jnp.pad(block_indices.astype(jnp.int32), ((0, 0), (0, 0), (0, 0), (0, width - topk)),
                constant_values=-1)
  counts = counts.astype(jnp.int32) if compacted else jnp.zeros((1, 1, 1), jnp.int32)
  paged = page_table is not None
  if paged:
    num_blocks, table = page_table.shape[1], jnp.clip(page_table, 0, num_pages - 1)
  else:  # contiguous: page b * num_blocks + j is block j of sequence b
    num_blocks, table = num_pages // b, jnp.zeros((1, 1), jnp.int32)
  q = jnp.pad(q.reshape(b, t, g, heads, d), ((0, 0), (0, 0), (0, 0), (0, rows - heads), (0, 0)))
  kernel = functools.partial(_kernel, block_size=block_size, num_blocks=num_blocks,
                             slots_per_split=slots_per_split, scale=scale, paged=paged,
                             compacted=compacted)
  whole = pl.BlockSpec()
  partial_out, partial_lse = pl.pallas_call(
      kernel,
      grid=(b, t, g, num_splits),
      in_specs=[whole] * 5 + [
          pl.BlockSpec((None, None, None, rows, d), lambda bi, ti, gi, si: (bi, ti, gi, 0, 0)),
          whole, whole],
      out_specs=[
          pl.BlockSpec((None, None, None, None, rows, dv),
                       lambda bi, ti, gi, si: (si, bi, ti, gi, 0, 0)),
          pl.BlockSpec((None, None, None, None, rows), lambda bi, ti, gi, si: (si, bi, ti, gi, 0)),
      ],
      out_shape=(jax.ShapeDtypeStruct((num_splits, b, t, g, rows, dv), jnp.float32),
                 jax.ShapeDtypeStruct((num_splits, b, t, g, rows), jnp.float32)),
      compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps,
                                          num_stages=cfg.num_stages),
      interpret=interpret,
      name="msa_paged_sparse_decode",
  )(ids, counts, q_positions, kv_lengths, table, q, k_pages, v_pages)
  return partial_out, partial_lse
