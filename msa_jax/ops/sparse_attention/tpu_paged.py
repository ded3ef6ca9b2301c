"""Paged sparse decode, TPUs (Pallas, Mosaic TPU): split-K over the selected pages.

Grid ``(B, q_len, G, splits)``. The compacted selection (valid block ids first), its counts,
the query positions, ``kv_lengths`` and the page table arrive by scalar prefetch (SMEM). A
program takes one (sequence, query token, group) and a share of its selected blocks: it maps
each block id to its page (``page_table[b, block]``), starts manual DMAs of the page's
``[Bk, D]`` keys and values of the group from HBM into VMEM for all its live slots at once,
then waits for and folds each slot in turn into an online softmax over the group's heads, so
later copies overlap earlier compute (as ``ops/tpu/ragged_paged_attention`` moves pages). Slots
past the count move nothing. Each program writes one float32 partial output and LSE;
``schedule.combine`` merges the splits.

Keys at or past ``kv_lengths[b]`` are masked in the logits and their values zeroed before
``P @ V``, so stale or poisoned page contents (NaN, inf) never reach an output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

MAX_SLOTS_PER_SPLIT = 16  # bounds the VMEM page buffers: 2 x 16 x Bk x D


def _kernel(ids_ref, count_ref, pos_ref, kv_len_ref, table_ref,  # scalar prefetch
            q_ref, k_hbm, v_hbm,  # inputs
            o_ref, lse_ref,  # outputs
            k_buf, v_buf, sems,  # scratch
            *, block_size, slots_per_split, scale, dims):
  b, t, g, split = (pl.program_id(i) for i in range(4))
  _, q_len, groups, slots, max_pages = dims
  row = (b * q_len + t) * groups + g
  first = split * slots_per_split
  n = jnp.clip(count_ref[row] - first, 0, slots_per_split)
  p = pos_ref[b * q_len + t]
  kv_len = kv_len_ref[b]

  def block(j):
    return ids_ref[row * slots + first + j]

  def copies(j):
    page = table_ref[b * max_pages + block(j)]
    return (pltpu.make_async_copy(k_hbm.at[page, :, g], k_buf.at[j], sems.at[0, j]),
            pltpu.make_async_copy(v_hbm.at[page, :, g], v_buf.at[j], sems.at[1, j]))

  for j in range(slots_per_split):
    @pl.when(j < n)
    def _(j=j):
      for c in copies(j):
        c.start()

  q = q_ref[...]  # [heads, D]
  heads = q.shape[0]
  key_row = lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
  key_col = lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)

  def body(j, carry):
    m, l, acc = carry
    for c in copies(j):
      c.wait()
    first_key = block(j) * block_size
    visible = (first_key + key_row <= p) & (first_key + key_row < kv_len)  # [1, Bk]
    visible_col = (first_key + key_col <= p) & (first_key + key_col < kv_len)  # [Bk, 1]
    k = k_buf[j]
    v = v_buf[j]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = jnp.where(visible, s * scale, -jnp.inf)
    # Stale tokens of the page may hold anything: 0 * NaN would leak through P @ V.
    v = jnp.where(visible_col, v, jnp.zeros((), v.dtype))
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    e = jnp.exp(s - m_safe)
    l = l * alpha + jnp.sum(e, axis=1, keepdims=True)
    acc = acc * alpha + lax.dot_general(e.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)
    return m_new, l, acc

  init = (jnp.full((heads, 1), -jnp.inf, jnp.float32), jnp.zeros((heads, 1), jnp.float32),
          jnp.zeros((heads, o_ref.shape[-1]), jnp.float32))
  m, l, acc = lax.fori_loop(0, n, body, init)
  has_keys = l != 0  # NaN (a visible NaN/Inf logit) is not "no keys"
  o_ref[...] = acc / jnp.where(has_keys, l, 1.0)
  lse_ref[...] = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), -jnp.inf)


def paged_sparse_decode_partials(q, k_pages, v_pages, page_table, block_ids, counts,
                                 q_positions, kv_lengths, *, block_size, scale, num_splits=None,
                                 interpret=False):
  """Returns partial_out f32 [splits,B,T,Hq,Dv], partial_lse f32 [splits,B,T,Hq].

  ``block_ids [B,T,G,k]`` compacted selection: the ``counts [B,T,G]`` valid, distinct, in-range
  ids first (``schedule.compact_selection``); every partial slot is written. Default split:
  enough splits that a program holds at most ``MAX_SLOTS_PER_SPLIT`` pages of K and of V in
  VMEM.
  """
  b, t, hq, d = q.shape
  num_pages, _, g, dv = v_pages.shape
  heads = hq // g
  topk = block_ids.shape[-1]
  max_pages = page_table.shape[1]
  if num_splits is None:
    num_splits = -(-topk // MAX_SLOTS_PER_SPLIT)
  slots_per_split = -(-topk // num_splits)
  num_splits = -(-topk // slots_per_split)
  slots = num_splits * slots_per_split
  ids = jnp.pad(block_ids, ((0, 0), (0, 0), (0, 0), (0, slots - topk)), constant_values=0)
  table = jnp.clip(page_table, 0, num_pages - 1)
  kernel = functools.partial(_kernel, block_size=block_size, slots_per_split=slots_per_split,
                             scale=scale, dims=(b, t, g, slots, max_pages))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(b, t, g, num_splits),
      in_specs=[
          pl.BlockSpec((None, None, None, heads, d), lambda bi, ti, gi, si, *_: (bi, ti, gi, 0, 0)),
          pl.BlockSpec(memory_space=pl.ANY),
          pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, None, heads, dv),
                       lambda bi, ti, gi, si, *_: (si, bi, ti, gi, 0, 0)),
          pl.BlockSpec((None, None, None, None, heads, 1),
                       lambda bi, ti, gi, si, *_: (si, bi, ti, gi, 0, 0)),
      ],
      scratch_shapes=[
          pltpu.VMEM((slots_per_split, block_size, d), k_pages.dtype),
          pltpu.VMEM((slots_per_split, block_size, dv), v_pages.dtype),
          pltpu.SemaphoreType.DMA((2, slots_per_split)),
      ],
  )
  partial_out, partial_lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=(jax.ShapeDtypeStruct((num_splits, b, t, g, heads, dv), jnp.float32),
                 jax.ShapeDtypeStruct((num_splits, b, t, g, heads, 1), jnp.float32)),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "parallel")),
      interpret=interpret,
      name="msa_paged_sparse_decode",
  )(ids.reshape(-1), counts.reshape(-1), q_positions.reshape(-1), kv_lengths,
    table.reshape(-1), q.reshape(b, t, g, heads, d), k_pages, v_pages)
  return (partial_out.reshape(num_splits, b, t, hq, dv),
          partial_lse.reshape(num_splits, b, t, hq))
