"""Paged index scoring for decode, TPUs (Pallas, Mosaic TPU).

Grid ``(B, page tiles)``. The page table, ``kv_lengths`` and the number of pages each
sequence's queries can see arrive by scalar prefetch (SMEM); the index pages stay in HBM and a
program copies its tile's ``pages_per_tile`` pages ``[Bk, Di]`` into VMEM by manual DMA
(``page_table[b, j]`` picks the page), as ``ops/tpu/ragged_paged_attention`` moves KV pages.
Pages past the last visible key are not copied (a tile with none is skipped), so page-table
entries past a sequence's length may be anything. Scores are computed transposed,
``[Bk, rows] = page @ q^T`` with the ``q_len * G`` (query, group) rows in lanes: the causal and
length masks compare a sublane iota of key positions with a lane row of query positions, the
block max is a sublane reduction, and the ``[pages_per_tile, rows]`` block maxima are the only
output. No exponentials (docs/msa.md §3.5); the top-k with the own block forced runs in XLA over
the ``[B, q, G, max_pages]`` maxima (small at decode).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

PAGES_PER_TILE = 8


def _kernel(kv_len_ref, needed_ref, table_ref,  # scalar prefetch
            pos_ref, q_ref, pages_hbm,  # inputs
            out_ref,  # output
            buf, sems,  # scratch
            *, block_size, pages_per_tile, table_width):
  b = pl.program_id(0)
  tile = pl.program_id(1)
  first = tile * pages_per_tile
  needed = needed_ref[b]  # pages holding a key visible to some query of the sequence

  def copy(j):
    page = table_ref[b * table_width + first + j]
    return pltpu.make_async_copy(pages_hbm.at[page], buf.at[j], sems.at[j])

  def for_live_pages(body):
    for j in range(pages_per_tile):
      pl.when(first + j < needed)(functools.partial(body, j))

  out_ref[...] = jnp.full(out_ref.shape, -jnp.inf, jnp.float32)

  @pl.when(first < needed)
  def _():
    for_live_pages(lambda j: copy(j).start())
    q = q_ref[...]  # [rows, Di]
    pos = pos_ref[...]  # [1, rows]
    kv_len = kv_len_ref[b]
    row = lax.broadcasted_iota(jnp.int32, (pages_per_tile, 1), 0)
    for_live_pages(lambda j: copy(j).wait())
    scores = jnp.full(out_ref.shape, -jnp.inf, jnp.float32)
    for j in range(pages_per_tile):
      k = buf[j]  # [Bk, Di]
      s = lax.dot_general(k, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
      key_pos = (first + j) * block_size + lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)
      visible = (key_pos <= pos) & (key_pos < kv_len)
      block_max = jnp.max(jnp.where(visible, s, -jnp.inf), axis=0, keepdims=True)
      scores = jnp.where(row == j, block_max, scores)
    out_ref[...] = scores


def paged_block_scores(q_idx, index_pages, page_table, q_positions, kv_lengths, *, block_size,
                       pages_per_tile=PAGES_PER_TILE, interpret=False):
  """Block-max scores ``[B,T,G,max_pages]`` (fp32, -inf where a block has no visible key)."""
  b, t, g, di = q_idx.shape
  num_pages = index_pages.shape[0]
  max_pages = page_table.shape[1]
  n_tiles = -(-max_pages // pages_per_tile)
  width = n_tiles * pages_per_tile
  rows = t * g
  table = jnp.pad(jnp.clip(page_table, 0, num_pages - 1), ((0, 0), (0, width - max_pages)))
  last_visible = jnp.minimum(jnp.max(q_positions, axis=1), kv_lengths - 1)
  needed = jnp.where(last_visible >= 0, last_visible // block_size + 1, 0).astype(jnp.int32)
  row_pos = jnp.repeat(q_positions, g, axis=1)[:, None, :]  # [B, 1, rows]
  q_rows = q_idx.reshape(b, rows, di)
  kernel = functools.partial(_kernel, block_size=block_size, pages_per_tile=pages_per_tile,
                             table_width=width)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(b, n_tiles),
      in_specs=[
          pl.BlockSpec((None, 1, rows), lambda bi, ti, *_: (bi, 0, 0)),
          pl.BlockSpec((None, rows, di), lambda bi, ti, *_: (bi, 0, 0)),
          pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=pl.BlockSpec((None, pages_per_tile, rows), lambda bi, ti, *_: (bi, ti, 0)),
      scratch_shapes=[
          pltpu.VMEM((pages_per_tile, block_size, di), index_pages.dtype),
          pltpu.SemaphoreType.DMA((pages_per_tile,)),
      ],
  )
  scores = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, width, rows), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret,
      name="msa_paged_index_block_scores",
  )(kv_lengths, needed, table.reshape(-1), row_pos, q_rows, index_pages)
  return scores[:, :max_pages].reshape(b, max_pages, t, g).transpose(0, 2, 3, 1)
