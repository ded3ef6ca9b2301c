"""Paged index scoring and selection for decode, GPUs (Pallas, Triton lowering).

The contiguous kernels of ``index_topk.py`` with one change: a key tile is ``blocks_per_tile``
pages of the sequence, each read through the page table (``index_pages[page_table[b, j]]``,
a ``[Bk, Di]`` page), so block ``j`` of the sequence is whatever page row b lists at ``j``.
Rows are the ``q_len * G`` (query, group) pairs of a sequence (1-16 query tokens). Per page:
one ``[block_rows, Di] x [Di, Bk]`` GEMM, the causal/length mask token by token, the max over
the page's keys; no exponentials (docs/msa.md §3.5). Page tiles past every row's last visible key
are skipped; inside a tile, table entries past the sequence's pages are clamped into the pool and
their keys masked, so page-table entries past a sequence's length may be anything.

Selection as in ``index_topk.py`` (tuning table section ``index_decode``, key ``selection``):
``"scores"`` writes block maxima and the top-k runs in XLA; ``"tile"`` keeps each page tile's
top-k (own block forced) and XLA merges those candidates; ``"fused"`` walks all page tiles of a
row tile in one program with a running top-k and writes only the block ids.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from msa_jax.ops.index_topk import gpu_triton as contiguous
from msa_jax import tuning

CONFIG = "index_decode"


def _shape(q_idx, page_table, block_size):
  return tuning.shape(page_table.shape[1] * block_size, q_idx.shape[1])


def _page_loader(pages_ref, table_ref, b, first_block, block_size):
  """load_keys(j) for ``_tile_block_maxima``: the page holding block first_block + j."""

  def load(j):
    page = table_ref[b, first_block + j]
    return pages_ref[page, pl.ds(0, block_size), :]

  return load


def _own_block(pos, kv_len, block_size):
  last_visible = jnp.minimum(pos, kv_len - 1)
  return last_visible, jnp.where(last_visible >= 0, last_visible // block_size, -1)


def _tile_scores(pos_ref, kv_len_ref, q_ref, pages_ref, table_ref, b, tile, *, block_size,
                 blocks_per_tile):
  """(block maxima [rows, bpt] with the own block forced to +inf, block ids [1, bpt])."""
  pos = pos_ref[...]
  kv_len = kv_len_ref[b]
  first_block = tile * blocks_per_tile
  load = _page_loader(pages_ref, table_ref, b, first_block, block_size)
  scores = contiguous._tile_block_maxima(q_ref, None, pos, kv_len, first_block * block_size,
                                         block_size, blocks_per_tile, load)
  _, own = _own_block(pos, kv_len, block_size)
  ids = first_block + lax.broadcasted_iota(jnp.int32, (1, blocks_per_tile), 1)
  return jnp.where(ids == own[:, None], jnp.inf, scores), ids


def _tile_needed(pos_ref, kv_len_ref, b, tile, block_size, blocks_per_tile):
  first_key = tile * blocks_per_tile * block_size
  return first_key <= jnp.minimum(jnp.max(pos_ref[...]), kv_len_ref[b] - 1)


def _scores_kernel(pos_ref, kv_len_ref, table_ref, q_ref, pages_ref, out_ref, *, block_size,
                   blocks_per_tile):
  b = pl.program_id(0)  # program ids are read outside pl.when (interpret mode needs it)
  tile = pl.program_id(2)
  out_ref[...] = jnp.full(out_ref.shape, -jnp.inf, jnp.float32)

  @pl.when(_tile_needed(pos_ref, kv_len_ref, b, tile, block_size, blocks_per_tile))
  def _():
    load = _page_loader(pages_ref, table_ref, b, tile * blocks_per_tile, block_size)
    out_ref[...] = contiguous._tile_block_maxima(
        q_ref, None, pos_ref[...], kv_len_ref[b], tile * blocks_per_tile * block_size,
        block_size, blocks_per_tile, load)


def _tile_topk_kernel(pos_ref, kv_len_ref, table_ref, q_ref, pages_ref, val_ref, id_ref, *,
                      block_size, blocks_per_tile):
  b = pl.program_id(0)
  tile = pl.program_id(2)
  kk = val_ref.shape[-1]
  val_ref[...] = jnp.full(val_ref.shape, -jnp.inf, jnp.float32)
  id_ref[...] = jnp.full(id_ref.shape, -1, jnp.int32)

  @pl.when(_tile_needed(pos_ref, kv_len_ref, b, tile, block_size, blocks_per_tile))
  def _():
    scores, ids = _tile_scores(pos_ref, kv_len_ref, q_ref, pages_ref, table_ref, b, tile,
                               block_size=block_size, blocks_per_tile=blocks_per_tile)
    rows = scores.shape[0]
    empty_vals = jnp.full((rows, kk), -jnp.inf, jnp.float32)
    empty_ids = jnp.full((rows, kk), -1, jnp.int32)
    vals, top = contiguous._merge_top(empty_vals, empty_ids, scores,
                                      jnp.broadcast_to(ids, scores.shape), kk)
    val_ref[...] = vals
    id_ref[...] = jnp.where(vals == -jnp.inf, -1, top)


def _fused_kernel(pos_ref, kv_len_ref, table_ref, q_ref, pages_ref, id_ref, *, block_size,
                  blocks_per_tile):
  b = pl.program_id(0)
  kk = id_ref.shape[-1]
  last_visible, _ = _own_block(pos_ref[...], kv_len_ref[b], block_size)
  tile_keys = blocks_per_tile * block_size
  n_tiles = (jnp.max(last_visible) + tile_keys) // tile_keys  # tiles holding a visible key

  def tile(j, carry):
    scores, ids = _tile_scores(pos_ref, kv_len_ref, q_ref, pages_ref, table_ref, b, j,
                               block_size=block_size, blocks_per_tile=blocks_per_tile)
    return contiguous._merge_top(*carry, scores, jnp.broadcast_to(ids, scores.shape), kk)

  init = (jnp.full(id_ref.shape, -jnp.inf, jnp.float32), jnp.full(id_ref.shape, -1, jnp.int32))
  vals, ids = lax.fori_loop(0, n_tiles, tile, init)
  id_ref[...] = jnp.where(vals == -jnp.inf, -1, ids)


def _layout(q_idx, page_table, q_positions, num_pages, cfg, spread=False):
  """(layout, page table padded to whole tiles) of a paged index kernel. Every entry of the
  table is a page id: unassigned (-1) and padding entries read page 0, masked by length."""
  x = contiguous.layout(q_idx, q_positions, page_table.shape[1], cfg, spread)
  table = jnp.pad(jnp.clip(page_table, 0, num_pages - 1),
                  ((0, 0), (0, x.n_tiles * x.bpt - x.nb)))
  return x, table


def _call(kernel, x, table, grid, row_tile, out_specs, out_shape, name, interpret, index_pages,
          kv_lengths):
  di = x.q_rows.shape[2]
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, x.block_rows), row_tile),
          pl.BlockSpec(),  # kv_lengths, read as scalars
          pl.BlockSpec(),  # page table, read as scalars
          pl.BlockSpec((None, x.block_rows, di), lambda *i: (*row_tile(*i), 0)),
          pl.BlockSpec(),  # index pages: the whole pool, pages picked in the kernel
      ],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=x.compiler_params,
      interpret=interpret,
      name=name,
  )(x.row_pos, kv_lengths, table, x.q_rows, index_pages)


def paged_block_scores(q_idx, index_pages, page_table, q_positions, kv_lengths, *, block_size,
                       interpret=False, **params):
  """Block-max scores ``[B,T,G,max_pages]`` (fp32; -inf where a block has no visible key)."""
  cfg = tuning.config(CONFIG, shape=_shape(q_idx, page_table, block_size), **params)
  x, table = _layout(q_idx, page_table, q_positions, index_pages.shape[0], cfg,
                     spread=not interpret)
  kernel = functools.partial(_scores_kernel, block_size=block_size, blocks_per_tile=x.bpt)
  rows_pad = x.q_rows.shape[1]
  scores = _call(kernel, x, table, x.grid, lambda bi, ri, ki: (bi, ri),
                 pl.BlockSpec((None, x.block_rows, x.bpt), lambda bi, ri, ki: (bi, ri, ki)),
                 jax.ShapeDtypeStruct((x.b, rows_pad, x.n_tiles * x.bpt), jnp.float32),
                 "msa_paged_index_block_scores", interpret, index_pages, kv_lengths)
  return x.rows_out(scores[..., :x.nb])


def paged_tile_candidates(q_idx, index_pages, page_table, q_positions, kv_lengths, *,
                          block_size, topk, interpret=False, **params):
  """Each page tile's top ``topk`` blocks (own block forced): (values f32, ids int32), both
  ``[B,T,G,n_tiles*kk]``, tile by tile; the selection is their top ``topk``
  (``index_topk.merge_candidates``)."""
  cfg = tuning.config(CONFIG, shape=_shape(q_idx, page_table, block_size), **params)
  x, table = _layout(q_idx, page_table, q_positions, index_pages.shape[0], cfg,
                     spread=not interpret)
  kk = min(pl.next_power_of_2(topk), x.bpt)
  kernel = functools.partial(_tile_topk_kernel, block_size=block_size, blocks_per_tile=x.bpt)
  spec = pl.BlockSpec((None, x.block_rows, kk), lambda bi, ri, ki: (bi, ri, ki))
  shape = (x.b, x.q_rows.shape[1], x.n_tiles * kk)
  vals, ids = _call(kernel, x, table, x.grid, lambda bi, ri, ki: (bi, ri), [spec, spec],
                    [jax.ShapeDtypeStruct(shape, jnp.float32),
                     jax.ShapeDtypeStruct(shape, jnp.int32)],
                    "msa_paged_index_tile_topk", interpret, index_pages, kv_lengths)
  return x.rows_out(vals), x.rows_out(ids)


def paged_fused_topk(q_idx, index_pages, page_table, q_positions, kv_lengths, *, block_size,
                     topk, interpret=False, **params):
  """The selection ``[B,T,G,topk]`` (-1 padded) from one kernel with a running top-k."""
  cfg = tuning.config(CONFIG, shape=_shape(q_idx, page_table, block_size), **params)
  x, table = _layout(q_idx, page_table, q_positions, index_pages.shape[0], cfg)
  kk = max(2, pl.next_power_of_2(topk))
  kernel = functools.partial(_fused_kernel, block_size=block_size, blocks_per_tile=x.bpt)
  rows_pad = x.q_rows.shape[1]
  ids = _call(kernel, x, table, (x.b, rows_pad // x.block_rows), lambda bi, ri: (bi, ri),
              pl.BlockSpec((None, x.block_rows, kk), lambda bi, ri: (bi, ri, 0)),
              jax.ShapeDtypeStruct((x.b, rows_pad, kk), jnp.int32),
              "msa_paged_index_fused_topk", interpret, index_pages, kv_lengths)
  return x.rows_out(ids)[..., :topk]


def paged_index_topk(q_idx, index_pages, page_table, q_positions, kv_lengths, *, block_size,
                     topk, interpret=False, selection=None, **params):
  """Selection ``int32 [B,T,G,topk]`` of logical block ids, by the table's ``selection``."""
  from msa_jax import reference
  cfg = tuning.config(CONFIG, shape=_shape(q_idx, page_table, block_size), **params)
  selection = selection or cfg.selection
  args = (q_idx, index_pages, page_table, q_positions, kv_lengths)
  if selection == "fused":
    return paged_fused_topk(*args, block_size=block_size, topk=topk, interpret=interpret,
                            **params)
  if selection == "tile":
    vals, ids = paged_tile_candidates(*args, block_size=block_size, topk=topk,
                                      interpret=interpret, **params)
    return contiguous.merge_candidates(vals, ids, topk, interpret=interpret)
  scores = paged_block_scores(*args, block_size=block_size, interpret=interpret, **params)
  return reference.select_blocks(scores, reference.own_block(q_positions, kv_lengths,
                                                             block_size), topk)
