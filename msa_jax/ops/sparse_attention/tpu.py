"""KV-outer block-sparse attention forward for TPUs (Pallas, Mosaic TPU).

Grid ``(work items,)``. The work table, the entry rows/positions and ``kv_lengths`` arrive by
scalar prefetch (SMEM). The K/V block of each item comes through the auto-pipeline: its
``index_map`` reads (batch, group, block) from the work table, so consecutive items of one hot
block reuse the block already in VMEM instead of fetching it again. The item's queries are
gathered row by row with manual DMAs from HBM into a ``[queries_per_item, Hq/G, D]`` VMEM tile
(one tile of ``queries_per_item * Hq/G`` rows against the block's ``Bk`` keys), and the
block-local output and LSE rows are scattered back by DMA to their preassigned slots, as
``ops/tpu/ragged_paged_attention`` moves pages. Lanes past the item's count move nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from msa_jax import schedule as sched
from msa_jax.ops.common import masking


def _kernel(items_ref, q_rows_ref, out_rows_ref, pos_ref, kv_len_ref,  # scalar prefetch
            q_hbm, k_ref, v_ref,  # inputs
            o_hbm, lse_hbm,  # outputs (HBM, written by DMA)
            q_tile, o_tile, lse_tile, q_sems, o_sems, lse_sems,  # scratch
            *, queries_per_item, heads, block_size, scale):
  b, _, blk, start, count = sched.read_item(items_ref, pl.program_id(0))

  def for_live_lanes(body):
    for r in range(queries_per_item):
      pl.when(r < count)(functools.partial(body, r))

  def q_copy(r):
    return pltpu.make_async_copy(q_hbm.at[q_rows_ref[start + r]], q_tile.at[r], q_sems.at[r])

  def o_copies(r):
    row = out_rows_ref[start + r]
    return (pltpu.make_async_copy(o_tile.at[r], o_hbm.at[row], o_sems.at[r]),
            pltpu.make_async_copy(lse_tile.at[r], lse_hbm.at[row], lse_sems.at[r]))

  @pl.when(count > 0)
  def _():
    for_live_lanes(lambda r: q_copy(r).start())
    rows = queries_per_item * heads
    row_query = lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // heads
    row_pos = jnp.full((rows, 1), -1, jnp.int32)
    for r in range(queries_per_item):
      row_pos = jnp.where(row_query == r, pos_ref[start + r], row_pos)
    key_pos = blk * block_size + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
    visible = (key_pos <= row_pos) & (key_pos < kv_len_ref[b])
    for_live_lanes(lambda r: q_copy(r).wait())

    q = q_tile[...].reshape(rows, q_tile.shape[-1])
    k = k_ref[...]
    key_col = blk * block_size + lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)
    v, bad = masking.clean_values(v_ref[...], key_col, kv_len_ref[b])
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = jnp.where(visible, s * scale, -jnp.inf)
    m = jnp.max(s, axis=1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=1, keepdims=True)
    o = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
    sees_bad = jnp.max(jnp.where(visible, bad.reshape(1, block_size), 0.0), axis=1,
                       keepdims=True)
    o, lse = masking.finalize(o, m, l, sees_bad)
    o_tile[...] = o.reshape(o_tile.shape).astype(o_tile.dtype)
    lse_tile[...] = lse.reshape(lse_tile.shape)

    def start_out(r):
      for c in o_copies(r):
        c.start()

    def wait_out(r):
      for c in o_copies(r):
        c.wait()

    for_live_lanes(start_out)
    for_live_lanes(wait_out)


def sparse_attention_partials(q, k, v, schedule: sched.Schedule, kv_lengths, *, block_size,
                              scale, topk, queries_per_item, interpret=False):
  """Run the KV-outer kernel. Returns partial_out [k,B,T,Hq,Dv], partial_lse [k,B,T,Hq]."""
  b, t, hq, d = q.shape
  g = k.shape[2]
  dv = v.shape[-1]
  heads = hq // g
  rows_out = topk * b * t * g
  # Head-major K/V so one (batch, group, block) tile is a contiguous [Bk, D] VMEM block.
  k = k.transpose(0, 2, 1, 3)
  v = v.transpose(0, 2, 1, 3)

  def kv_index(i, items, *_):
    b, g, blk, _, _ = sched.read_item(items, i)
    return b, g, blk, 0

  kernel = functools.partial(_kernel, queries_per_item=queries_per_item, heads=heads,
                             block_size=block_size, scale=scale)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(schedule.max_items,),
      in_specs=[
          pl.BlockSpec(memory_space=pl.ANY),
          pl.BlockSpec((None, None, block_size, d), kv_index),
          pl.BlockSpec((None, None, block_size, dv), kv_index),
      ],
      out_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
      scratch_shapes=[
          pltpu.VMEM((queries_per_item, heads, d), q.dtype),
          pltpu.VMEM((queries_per_item, heads, dv), q.dtype),
          pltpu.VMEM((queries_per_item, heads), jnp.float32),
          pltpu.SemaphoreType.DMA((queries_per_item,)),
          pltpu.SemaphoreType.DMA((queries_per_item,)),
          pltpu.SemaphoreType.DMA((queries_per_item,)),
      ],
  )
  partial_out, partial_lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=(jax.ShapeDtypeStruct((rows_out + 1, heads, dv), q.dtype),
                 jax.ShapeDtypeStruct((rows_out + 1, heads), jnp.float32)),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=interpret,
      name="msa_sparse_attention_kv_outer",
  )(schedule.items.reshape(-1), schedule.q_rows, schedule.out_rows, schedule.positions,
    kv_lengths, q.reshape(b * t * g, heads, d), k, v)
  partial_out = partial_out[:rows_out].reshape(topk, b, t, hq, dv)
  partial_lse = partial_lse[:rows_out].reshape(topk, b, t, hq)
  return partial_out, partial_lse
