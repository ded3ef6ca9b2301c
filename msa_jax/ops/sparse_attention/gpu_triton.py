"""KV-outer block-sparse attention forward for GPUs (Pallas, Triton lowering).

A work item of ``schedule.build_schedule`` is a piece of one (batch, group, KV block) list.
The program loads that K/V block once, then walks the item's entries one tile at a time
(``queries_per_tile`` positions x the group's ``Hq/G`` heads = one tile of rows): it gathers
the tile's queries, runs an exact softmax over the block's visible keys and scatters the
block-local output and LSE into the preassigned slots of the partial buffers. With
``tiles_per_item > 1`` the schedule's items hold that many tiles, so a popular block's K/V
stays in registers/shared memory across several tiles; ``items_per_program`` items run in
one program (a loop Triton can pipeline). Row gathers and scatters use vector indexing of
whole-array refs (as ``ops/gpu/paged_attention.py`` gathers pages); lanes past the item's
count read query row 0 and write the scratch row. Values a row cannot see never reach it,
even as NaN or Inf (``ops/common/masking.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from msa_jax import schedule as sched
from msa_jax.ops.common import masking
from msa_jax import tuning


def work_item_size(heads: int, tile_rows: int | None = None, tiles_per_item: int | None = None,
                   shape: dict | None = None) -> tuple[int, int]:
  """(queries per tile, entries per work item) for a group of ``heads`` query heads.

  Unset arguments come from the per-card table. Build the schedule with the second number
  and pass both to ``sparse_attention_partials``.
  """
  cfg = tuning.config("sparse", shape=shape, tile_rows=tile_rows, tiles_per_item=tiles_per_item)
  per_tile = max(1, cfg.tile_rows // heads)
  return per_tile, per_tile * cfg.tiles_per_item


def _dot(a, b, contract_b):
  """a @ b (contract_b=0) or a @ b.T (contract_b=1) with fp32 accumulation."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _kernel(items_ref, q_rows_ref, out_rows_ref, pos_ref, kv_len_ref, q_ref, k_ref, v_ref,
            o_ref, lse_ref, *, items_per_program, **params):
  # Several work items per program: the loop lets Triton overlap the next item's gathers
  # with this item's math.
  first = pl.program_id(0) * items_per_program

  def body(n, carry):
    _attend_item(first + n, items_ref, q_rows_ref, out_rows_ref, pos_ref, kv_len_ref, q_ref,
                 k_ref, v_ref, o_ref, lse_ref, **params)
    return carry

  lax.fori_loop(0, items_per_program, body, 0)


def _attend_item(i, items_ref, q_rows_ref, out_rows_ref, pos_ref, kv_len_ref, q_ref, k_ref,
                 v_ref, o_ref, lse_ref, *, queries_per_tile, tiles_per_item, block_size,
                 **params):
  b, g, blk, start, count = sched.read_item(items_ref, i)

  @pl.when(count > 0)
  def _():
    keys = pl.ds(blk * block_size, block_size)
    k = k_ref[b, keys, g, :]
    key_col = blk * block_size + lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)
    v, bad = masking.clean_values(v_ref[b, keys, g, :], key_col, kv_len_ref[b])
    tile = functools.partial(_attend_tile, q_rows_ref=q_rows_ref, out_rows_ref=out_rows_ref,
                             pos_ref=pos_ref, q_ref=q_ref, o_ref=o_ref, lse_ref=lse_ref, k=k,
                             v=v, bad=bad.reshape(1, block_size), blk=blk,
                             kv_len=kv_len_ref[b], block_size=block_size,
                             queries_per_tile=queries_per_tile, **params)
    if tiles_per_item == 1:
      tile(start, count)
    else:  # K/V stay loaded while the item's tiles stream through
      def body(n, carry):
        tile(start + n * queries_per_tile, count - n * queries_per_tile)
        return carry

      lax.fori_loop(0, (count + queries_per_tile - 1) // queries_per_tile, body, 0)


def _attend_tile(start, count, *, q_rows_ref, out_rows_ref, pos_ref, q_ref, o_ref, lse_ref, k,
                 v, bad, blk, kv_len, block_size, queries_per_tile, heads, scale, scratch_row):
  lane = lax.broadcasted_iota(jnp.int32, (queries_per_tile,), 0)
  live = lane < count
  entries = pl.ds(start, queries_per_tile)
  q_rows = jnp.where(live, q_rows_ref[entries], 0)
  out_rows = jnp.where(live, out_rows_ref[entries], scratch_row)
  pos = jnp.where(live, pos_ref[entries], -1)

  rows = queries_per_tile * heads
  q = q_ref[q_rows].reshape(rows, q_ref.shape[-1])
  s = _dot(q, k, 1) * scale  # [rows, Bk]
  row_pos = jnp.broadcast_to(pos[:, None], (queries_per_tile, heads)).reshape(rows)
  key_pos = blk * block_size + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
  visible = (key_pos <= row_pos[:, None]) & (key_pos < kv_len)
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=1)
  m = jnp.where(m == -jnp.inf, 0.0, m)
  p = jnp.exp(s - m[:, None])
  l = jnp.sum(p, axis=1)
  o = _dot(p.astype(v.dtype), v, 0)
  o, lse = masking.finalize(o, m, l, jnp.max(jnp.where(visible, bad, 0.0), axis=1))
  o_ref[out_rows] = o.reshape(queries_per_tile, heads, o_ref.shape[-1]).astype(o_ref.dtype)
  lse_ref[out_rows] = lse.reshape(queries_per_tile, heads)


def sparse_attention_partials(q, k, v, schedule: sched.Schedule, kv_lengths, *, block_size,
                              scale, topk, queries_per_tile, tiles_per_item=1,
                              items_per_program=None, num_warps=None, num_stages=None,
                              shape=None, interpret=False):
  """Run the KV-outer kernel. Returns partial_out [k,B,T,Hq,Dv], partial_lse [k,B,T,Hq].

  ``schedule`` must have been built with ``queries_per_tile * tiles_per_item`` entries per
  item (``work_item_size``). Launch parameters left as None come from the per-card table
  (``msa_jax.tuning``).
  """
  cfg = tuning.config("sparse", shape=shape or tuning.shape(k.shape[1], q.shape[1]),
                      items_per_program=items_per_program, num_warps=num_warps,
                      num_stages=num_stages)
  b, t, hq, d = q.shape
  g = k.shape[2]
  dv = v.shape[-1]
  heads = hq // g
  rows_out = topk * b * t * g
  ipp = cfg.items_per_program
  num_programs = -(-schedule.max_items // ipp)
  items = jnp.pad(schedule.items, ((0, num_programs * ipp - schedule.max_items), (0, 0)))
  kernel = functools.partial(_kernel, items_per_program=ipp, queries_per_tile=queries_per_tile,
                             tiles_per_item=tiles_per_item, heads=heads, block_size=block_size,
                             scale=scale, scratch_row=rows_out)
  partial_out, partial_lse = pl.pallas_call(
      kernel,
      grid=(num_programs,),
      out_shape=(jax.ShapeDtypeStruct((rows_out + 1, heads, dv), q.dtype),
                 jax.ShapeDtypeStruct((rows_out + 1, heads), jnp.float32)),
      compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps,
                                          num_stages=cfg.num_stages),
      interpret=interpret,
      name="msa_sparse_attention_kv_outer",
  )(items.reshape(-1), schedule.q_rows, schedule.out_rows, schedule.positions, kv_lengths,
    q.reshape(b * t * g, heads, d), k, v)
  partial_out = partial_out[:rows_out].reshape(topk, b, t, hq, dv)
  partial_lse = partial_lse[:rows_out].reshape(topk, b, t, hq)
  return partial_out, partial_lse
