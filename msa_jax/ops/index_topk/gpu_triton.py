"""Index scoring with the block max-pool fused, for GPUs (Pallas, Triton lowering).

All G index heads share one index key head, so a program scores a tile of ``block_rows``
(query, group) rows against ``blocks_per_tile`` KV blocks: each key tile is read once for
every group. Per block: one ``[block_rows, Di] x [Di, Bk]`` GEMM, the causal/length mask
applied token by token, then the max over the block's keys. Only the block maxima
``[block_rows, blocks_per_tile]`` leave the program: token scores never reach HBM. Key tiles
entirely past every row's last visible key skip the GEMMs (causal prefill: half the grid).
No exponentials anywhere (exp-free selection, docs/msa.md §3.5).

Three ways to select, chosen per card and per phase by the tuning table's ``selection``:

* ``"scores"``: ``block_scores`` writes the block maxima; the top-k runs in XLA.
* ``"tile"``: ``tile_candidates`` keeps only each key tile's top-k (own block forced), so the
  full block-score matrix is never written; the final top-k runs over those candidates.
* ``"fused"``: ``fused_topk`` gives each program a row tile and walks all of its key tiles,
  merging every tile's block maxima into a running top-k held in registers: only the final
  block ids leave the kernel (docs/msa.md §6: the ``[G, T, S/Bk]`` matrix is never materialised, no
  top-k outside). One program per row tile, so it needs many query rows (prefill), not decode.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from msa_jax import checks
from msa_jax import tuning
from msa_jax.ops.index_topk import config as index_config


def config_key(q_len: int) -> str:
  """The tuning table's section for ``q_len`` queries per sequence (decode or prefill)."""
  return "index_decode" if checks.is_decode(q_len) else "index"


def _tile_block_maxima(q_ref, k_ref, pos, kv_len, first_key, block_size, blocks_per_tile,
                       load_keys=None):
  """[block_rows, blocks_per_tile] maxima of the visible token scores of each block.

  ``load_keys(j)`` returns the key tile's block j (default: rows of ``k_ref``, which holds
  exactly the tile's keys).
  """
  q = q_ref[...]  # [block_rows, Di]
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  col = lax.broadcasted_iota(jnp.int32, (1, blocks_per_tile), 1)
  key_iota = lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
  if load_keys is None:
    load_keys = lambda j: k_ref[pl.ds(pl.multiple_of(j * block_size, block_size), block_size),
                                :]

  def body(j, scores):
    k = load_keys(j)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
    key_pos = first_key + j * block_size + key_iota
    visible = (key_pos <= pos[:, None]) & (key_pos < kv_len)
    block_max = jnp.max(jnp.where(visible, s, -jnp.inf), axis=1)
    return jnp.where(col == j, block_max[:, None], scores)

  init = jnp.full((q.shape[0], blocks_per_tile), -jnp.inf, jnp.float32)
  return lax.fori_loop(0, blocks_per_tile, body, init)


def _scores_kernel(pos_ref, kv_len_ref, q_ref, k_ref, out_ref, *, block_size, blocks_per_tile):
  b = pl.program_id(0)
  tile = pl.program_id(2)
  pos = pos_ref[...]  # [block_rows]
  kv_len = kv_len_ref[b]
  first_key = tile * blocks_per_tile * block_size
  out_ref[...] = jnp.full(out_ref.shape, -jnp.inf, jnp.float32)

  # Key tiles past every row's last visible key (half the grid in causal prefill): no GEMMs.
  @pl.when(first_key <= jnp.minimum(jnp.max(pos), kv_len - 1))
  def _():
    out_ref[...] = _tile_block_maxima(q_ref, k_ref, pos, kv_len, first_key, block_size,
                                      blocks_per_tile)


def _tile_topk_kernel(pos_ref, kv_len_ref, q_ref, k_ref, val_ref, id_ref, *, block_size,
                     blocks_per_tile):
  """Per key tile: block maxima, own block forced to +inf, then the tile's top entries."""
  b = pl.program_id(0)
  tile = pl.program_id(2)
  pos = pos_ref[...]
  kv_len = kv_len_ref[b]
  first_key = tile * blocks_per_tile * block_size
  kk = val_ref.shape[-1]
  val_ref[...] = jnp.full(val_ref.shape, -jnp.inf, jnp.float32)
  id_ref[...] = jnp.full(id_ref.shape, -1, jnp.int32)

  @pl.when(first_key <= jnp.minimum(jnp.max(pos), kv_len - 1))
  def _():
    scores = _tile_block_maxima(q_ref, k_ref, pos, kv_len, first_key, block_size,
                                blocks_per_tile)
    col = lax.broadcasted_iota(jnp.int32, (1, blocks_per_tile), 1)
    last_visible = jnp.minimum(pos, kv_len - 1)
    own = jnp.where(last_visible >= 0, last_visible // block_size, -1)
    block_id = tile * blocks_per_tile + col
    scores = jnp.where(block_id == own[:, None], jnp.inf, scores)
    out_col = lax.broadcasted_iota(jnp.int32, (1, kk), 1)

    def extract(step, carry):  # the next-highest entry; ties to the lower block id
      scores, vals, ids = carry
      best = jnp.max(scores, axis=1)
      at = jnp.min(jnp.where(scores == best[:, None], col, blocks_per_tile), axis=1)
      vals = jnp.where(out_col == step, best[:, None], vals)
      ids = jnp.where(out_col == step, tile * blocks_per_tile + at[:, None], ids)
      return jnp.where(col == at[:, None], -jnp.inf, scores), vals, ids

    init = (scores, jnp.full(val_ref.shape, -jnp.inf, jnp.float32),
            jnp.full(id_ref.shape, -1, jnp.int32))
    _, vals, ids = lax.fori_loop(0, kk, extract, init)
    val_ref[...] = vals
    id_ref[...] = ids


def _merge_top(run_vals, run_ids, new_vals, new_ids, kk):
  """Top ``kk`` of a running list and a tile's entries (descending; ties to the lower id).

  ``run_*`` [rows, kk] hold earlier key tiles (lower block ids than every ``new_ids``);
  entries equal to -inf carry no meaning and come out with id -1 at the end.
  """
  out_col = lax.broadcasted_iota(jnp.int32, (1, kk), 1)
  big = jnp.int32(2**30)

  def extract(step, carry):
    run_vals, new_vals, vals, ids = carry
    best = jnp.maximum(jnp.max(run_vals, axis=1), jnp.max(new_vals, axis=1))[:, None]
    chosen = jnp.minimum(jnp.min(jnp.where(run_vals == best, run_ids, big), axis=1),
                         jnp.min(jnp.where(new_vals == best, new_ids, big), axis=1))[:, None]
    vals = jnp.where(out_col == step, best, vals)
    ids = jnp.where(out_col == step, chosen, ids)
    run_vals = jnp.where(run_ids == chosen, -jnp.inf, run_vals)
    new_vals = jnp.where(new_ids == chosen, -jnp.inf, new_vals)
    return run_vals, new_vals, vals, ids

  init = (run_vals, new_vals, jnp.full(run_vals.shape, -jnp.inf, jnp.float32),
          jnp.full(run_ids.shape, -1, jnp.int32))
  _, _, vals, ids = lax.fori_loop(0, kk, extract, init)
  return vals, ids


MERGE_MAX_CANDIDATES = 8192  # per row: the most one merge program holds in registers


def merge_candidates(values, ids, topk, *, interpret=False):
  """``reference.top_candidates`` as one small kernel, for the few rows of a decode step.

  ``values``/``ids`` ``[..., n]``: candidate lists in which equal values keep the lower block
  id first (the tile-by-tile candidates of ``tile_candidates``, the paged kernel and the
  Mosaic kernel's key ranges). One program per row holds the row in registers and extracts
  ``topk`` times the highest value, the lowest id among equals: one launch where XLA's
  two-stage top-k takes two sorts and their gathers. Returns int32 ``[..., topk]``, -1 where
  no finite candidate is left. Longer rows than ``MERGE_MAX_CANDIDATES`` go to XLA.
  """
  from msa_jax import reference
  *lead, n = values.shape
  if n > MERGE_MAX_CANDIDATES:
    return reference.top_candidates(values, ids, topk)
  rows = math.prod(lead)
  width, kk = max(2, pl.next_power_of_2(n)), max(2, pl.next_power_of_2(topk))
  pad = lambda x, fill: jnp.pad(x.reshape(rows, n), ((0, 0), (0, width - n)),
                                constant_values=fill)
  row_spec = lambda size: pl.BlockSpec((None, size), lambda r: (r, 0))
  out = pl.pallas_call(
      functools.partial(_merge_kernel, topk=kk),
      grid=(rows,),
      in_specs=[row_spec(width), row_spec(width)],
      out_specs=row_spec(kk),
      out_shape=jax.ShapeDtypeStruct((rows, kk), jnp.int32),
      compiler_params=pltr.CompilerParams(num_warps=4 if width <= 4096 else 8, num_stages=1),
      interpret=interpret,
      name="msa_index_merge_candidates",
  )(pad(values.astype(jnp.float32), -jnp.inf), pad(ids.astype(jnp.int32), -1))
  return out[:, :topk].reshape(*lead, topk)


def _merge_kernel(val_ref, id_ref, out_ref, *, topk):
  ids = id_ref[...]
  out_col = lax.broadcasted_iota(jnp.int32, (topk,), 0)
  big = jnp.int32(2**30)

  def extract(step, carry):
    vals, out = carry
    best = jnp.max(vals)
    chosen = jnp.min(jnp.where(vals == best, ids, big))
    out = jnp.where(out_col == step, jnp.where(best == -jnp.inf, -1, chosen), out)
    return jnp.where(ids == chosen, -jnp.inf, vals), out

  _, out = lax.fori_loop(0, topk, extract, (val_ref[...], jnp.full((topk,), -1, jnp.int32)))
  out_ref[...] = out


def _fused_topk_kernel(pos_ref, kv_len_ref, q_ref, k_ref, id_ref, *, block_size,
                       blocks_per_tile):
  """A row tile against all its visible key tiles, keeping a running top-k of block maxima."""
  b = pl.program_id(0)
  pos = pos_ref[...]  # [block_rows]
  kv_len = kv_len_ref[b]
  kk = id_ref.shape[-1]
  last_visible = jnp.minimum(pos, kv_len - 1)
  own = jnp.where(last_visible >= 0, last_visible // block_size, -1)
  tile_keys = blocks_per_tile * block_size
  n_tiles = (jnp.max(last_visible) + tile_keys) // tile_keys  # tiles holding a visible key
  col = lax.broadcasted_iota(jnp.int32, (1, blocks_per_tile), 1)

  def tile(j, carry):
    run_vals, run_ids = carry
    first_key = j * tile_keys

    def load_keys(jj):
      start = pl.multiple_of(first_key + jj * block_size, block_size)
      return k_ref[b, pl.ds(start, block_size), :]

    scores = _tile_block_maxima(q_ref, None, pos, kv_len, first_key, block_size,
                                blocks_per_tile, load_keys)
    new_ids = j * blocks_per_tile + col
    scores = jnp.where(new_ids == own[:, None], jnp.inf, scores)
    return _merge_top(run_vals, run_ids, scores, new_ids, kk)

  init = (jnp.full(id_ref.shape, -jnp.inf, jnp.float32), jnp.full(id_ref.shape, -1, jnp.int32))
  vals, ids = lax.fori_loop(0, n_tiles, tile, init)
  id_ref[...] = jnp.where(vals == -jnp.inf, -1, ids)


def fused_topk(q_idx, k_idx, q_positions, kv_lengths, *, block_size, topk, block_rows=None,
               blocks_per_tile=None, num_warps=None, num_stages=None, interpret=False):
  """The selection, int32 ``[B,T,G,topk]`` (-1 padded), from one kernel: scoring, block
  max-pool and a running top-k per row tile (no block scores or candidates in HBM)."""
  x, k_idx = _layout(q_idx, k_idx, q_positions, block_size, False, block_rows=block_rows,
                     blocks_per_tile=blocks_per_tile, num_warps=num_warps,
                     num_stages=num_stages)
  kk = max(2, pl.next_power_of_2(topk))
  n_row_tiles = x.q_rows.shape[1] // x.block_rows
  # Later rows see more keys (causal): launch them first so the longest programs start early.
  row_tile = lambda bi, ri: (bi, n_row_tiles - 1 - ri)
  kernel = functools.partial(_fused_topk_kernel, block_size=block_size, blocks_per_tile=x.bpt)
  ids = pl.pallas_call(
      kernel,
      grid=(x.b, n_row_tiles),
      in_specs=[
          pl.BlockSpec((None, x.block_rows), row_tile),
          pl.BlockSpec(),  # kv_lengths: the whole array, read as scalars
          pl.BlockSpec((None, x.block_rows, x.q_rows.shape[2]),
                       lambda bi, ri: (*row_tile(bi, ri), 0)),
          pl.BlockSpec(),  # index keys: the whole array, tiles sliced in the kernel
      ],
      out_specs=pl.BlockSpec((None, x.block_rows, kk), lambda bi, ri: (*row_tile(bi, ri), 0)),
      out_shape=jax.ShapeDtypeStruct((x.b, x.q_rows.shape[1], kk), jnp.int32),
      compiler_params=x.compiler_params,
      interpret=interpret,
      name="msa_index_fused_topk",
  )(x.row_pos, kv_lengths, x.q_rows, k_idx)
  return x.rows_out(ids)[..., :topk]


def tile_candidates(q_idx, k_idx, q_positions, kv_lengths, *, block_size, topk,
                    block_rows=None, blocks_per_tile=None, num_warps=None, num_stages=None,
                    interpret=False):
  """Selection candidates: each key tile's top ``topk`` blocks, own block forced.

  Returns (values f32, block ids int32), both ``[B,T,G,n_tiles*kk]`` laid out tile by tile,
  each tile's entries by descending value then ascending id, -inf/-1 where empty. The
  selection is the top ``topk`` of these (``reference.exact_top_k`` keeps the tie order), so
  the full block-score matrix is never written.
  """
  x, k_idx = _layout(q_idx, k_idx, q_positions, block_size, interpret, block_rows=block_rows,
                     blocks_per_tile=blocks_per_tile, num_warps=num_warps,
                     num_stages=num_stages)
  kk = min(pl.next_power_of_2(topk), x.bpt)
  kernel = functools.partial(_tile_topk_kernel, block_size=block_size, blocks_per_tile=x.bpt)
  out_spec = pl.BlockSpec((None, x.block_rows, kk), lambda bi, ri, ki: (bi, ri, ki))
  shape = (x.b, x.q_rows.shape[1], x.n_tiles * kk)
  vals, ids = pl.pallas_call(
      kernel,
      grid=x.grid,
      in_specs=_in_specs(x, block_size),
      out_specs=[out_spec, out_spec],
      out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32)],
      compiler_params=x.compiler_params,
      interpret=interpret,
      name="msa_index_tile_topk",
  )(x.row_pos, kv_lengths, x.q_rows, k_idx)
  return x.rows_out(vals), x.rows_out(ids)


def spread_blocks_per_tile(blocks_per_tile: int, num_blocks: int, row_programs: int,
                           min_programs: int) -> int:
  """``blocks_per_tile`` halved until ``row_programs`` x key tiles reaches ``min_programs``
  (or one block per tile): with few query rows (decode) the key tiles are the whole grid,
  and a 64-block cache in tiles of 32 would run on two SMs."""
  while blocks_per_tile > 1 and row_programs * -(-num_blocks // blocks_per_tile) < min_programs:
    blocks_per_tile //= 2
  return blocks_per_tile


class Layout(NamedTuple):
  """An index kernel's launch: rows = (query, group) pairs padded to the row tile, key blocks
  in tiles of ``bpt`` (the paged kernels' tiles are of pages)."""
  cfg: index_config.Config
  b: int
  t: int
  g: int
  nb: int  # key blocks (pages) per sequence
  n_tiles: int  # key tiles
  bpt: int  # blocks per key tile
  block_rows: int
  rows: int  # t * g, before padding
  q_rows: jax.Array  # [B, rows padded, Di]
  row_pos: jax.Array  # [B, rows padded], -1 on padding rows

  @property
  def compiler_params(self):
    return pltr.CompilerParams(num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)

  @property
  def grid(self):
    """(batch, row tile, key tile): the grid of the kernels that write per key tile."""
    return self.b, self.q_rows.shape[1] // self.block_rows, self.n_tiles

  def rows_out(self, x):
    """A kernel output ``[B, rows padded, n]`` as ``[B, T, G, n]``."""
    return x[:, :self.rows].reshape(self.b, self.t, self.g, -1)


def layout(q_idx, q_positions, num_blocks, cfg, spread) -> Layout:
  """The rows and key tiles of an index kernel over ``num_blocks`` blocks per sequence;
  ``spread``: fewer blocks per tile where the grid would be small (compiled decode)."""
  b, t, g, di = q_idx.shape
  rows = t * g
  block_rows = min(cfg.block_rows, max(16, pl.next_power_of_2(rows)))
  rows_pad = -(-rows // block_rows) * block_rows
  bpt = min(cfg.blocks_per_tile, pl.next_power_of_2(num_blocks))
  if spread:
    bpt = spread_blocks_per_tile(bpt, num_blocks, b * rows_pad // block_rows, cfg.min_programs)
  q_rows = jnp.pad(q_idx.reshape(b, rows, di), ((0, 0), (0, rows_pad - rows), (0, 0)))
  row_pos = jnp.pad(jnp.repeat(q_positions, g, axis=1), ((0, 0), (0, rows_pad - rows)),
                    constant_values=-1)
  return Layout(cfg, b, t, g, num_blocks, -(-num_blocks // bpt), bpt, block_rows, rows,
                q_rows, row_pos)


def _layout(q_idx, k_idx, q_positions, block_size, interpret, **launch):
  """(layout, index keys padded to whole key tiles) of a contiguous index kernel; ``launch``
  parameters left as None come from the per-card table (``msa_jax.tuning``)."""
  t, s_len = q_idx.shape[1], k_idx.shape[1]
  cfg = tuning.config(config_key(t), shape=tuning.shape(s_len, t), **launch)
  x = layout(q_idx, q_positions, -(-s_len // block_size), cfg, spread=not interpret)
  keys = x.n_tiles * x.bpt * block_size
  return x, jnp.pad(k_idx, ((0, 0), (0, keys - s_len), (0, 0)))


def _in_specs(x: Layout, block_size):
  di = x.q_rows.shape[2]
  return [
      pl.BlockSpec((None, x.block_rows), lambda bi, ri, ki: (bi, ri)),
      pl.BlockSpec(),  # kv_lengths: the whole array, read as scalars
      pl.BlockSpec((None, x.block_rows, di), lambda bi, ri, ki: (bi, ri, 0)),
      pl.BlockSpec((None, x.bpt * block_size, di), lambda bi, ri, ki: (bi, ki, 0)),
  ]


def block_scores(q_idx, k_idx, q_positions, kv_lengths, *, block_size, block_rows=None,
                 blocks_per_tile=None, num_warps=None, num_stages=None, interpret=False):
  """Block-max scores ``[B,T,G,nb]`` (fp32, -inf where no key is visible).

  Launch parameters left as None come from the per-card table (``msa_jax.tuning``).
  """
  x, k_idx = _layout(q_idx, k_idx, q_positions, block_size, interpret, block_rows=block_rows,
                     blocks_per_tile=blocks_per_tile, num_warps=num_warps,
                     num_stages=num_stages)
  kernel = functools.partial(_scores_kernel, block_size=block_size, blocks_per_tile=x.bpt)
  scores = pl.pallas_call(
      kernel,
      grid=x.grid,
      in_specs=_in_specs(x, block_size),
      out_specs=pl.BlockSpec((None, x.block_rows, x.bpt), lambda bi, ri, ki: (bi, ri, ki)),
      out_shape=jax.ShapeDtypeStruct((x.b, x.q_rows.shape[1], x.n_tiles * x.bpt), jnp.float32),
      compiler_params=x.compiler_params,
      interpret=interpret,
      name="msa_index_block_scores",
  )(x.row_pos, kv_lengths, x.q_rows, k_idx)
  return x.rows_out(scores[..., :x.nb])
