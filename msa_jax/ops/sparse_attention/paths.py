"""``sparse_attention``'s paths, one per (implementation, query count) row of
``msa_jax.dispatch``, and the differentiable Pallas forward (``differentiable``: a
``custom_vjp`` whose backward runs the backward kernels).

Each path takes ``q [B, T, Hq, D]``, a ``KV`` source with ``k``, ``v`` (contiguous or
paged), the selection ``block_indices [B, T, G, topk]`` and the query positions, and returns
(out ``[B, T, Hq, Dv]``, float32 lse ``[B, T, Hq]``).
"""

from __future__ import annotations

import functools
import importlib

import jax
from jax import lax
import jax.numpy as jnp

from msa_jax import reference
from msa_jax import schedule as sched
from msa_jax import tuning
from msa_jax.source import KV


def xla(q, source, block_indices, q_positions, *, block_size, scale, interpret):
  del interpret
  source = source.contiguous()
  return reference.sparse_attention(q, source.k, source.v, block_indices, q_positions,
                                    source.lengths, block_size=block_size, scale=scale)


def gpu_prefill(q, source, block_indices, q_positions, **kw):
  return _differentiable(q, source, block_indices, q_positions, forward=_gpu_kv_outer,
                         backward="gpu_triton_bwd", **kw)


def gpu_decode(q, source, block_indices, q_positions, **kw):
  if source.paged:  # serving: no gradient over pages
    return _gpu_split_k(q, source, block_indices, q_positions, **kw)
  return _differentiable(q, source, block_indices, q_positions, forward=_gpu_split_k,
                         backward="gpu_triton_bwd", **kw)


def tpu_prefill(q, source, block_indices, q_positions, **kw):
  return _differentiable(q, source, block_indices, q_positions, forward=_tpu_kv_outer,
                         backward="tpu_bwd", **kw)


def tpu_decode(q, source, block_indices, q_positions, **kw):
  if source.paged:
    return _tpu_paged(q, source, block_indices, q_positions, **kw)
  return tpu_prefill(q, source, block_indices, q_positions, **kw)


def _differentiable(q, source, block_indices, q_positions, *, block_size, scale, interpret,
                    forward, backward):
  source = source.contiguous()
  return differentiable(q, source.k, source.v, block_indices, q_positions, source.lengths,
                        block_size, scale, forward, backward, interpret)


# ----------------------------------------------------------------------------- forward passes


def _gpu_split_k(q, source, block_indices, q_positions, *, block_size, scale, interpret):
  """Query-outer split-K over each query's selected pages (a contiguous cache seen as
  pages): with few queries per sequence there is nothing to share across queries."""
  from msa_jax.ops.sparse_attention import gpu_triton_paged as kernel
  pages = source.as_pages(block_size)
  return kernel.paged_sparse_decode(q, pages.k, pages.v, pages.page_table, block_indices,
                                    q_positions, source.lengths, block_size=block_size,
                                    scale=scale, interpret=interpret)


def _tpu_paged(q, source, block_indices, q_positions, *, block_size, scale, interpret):
  """The pages of each query's selection, one split per program, LSE-combined."""
  from msa_jax.ops.sparse_attention import tpu_paged as kernel
  ids, counts = sched.compact_selection(block_indices, source.page_table.shape[1])
  partial_out, partial_lse = kernel.paged_sparse_decode_partials(
      q, source.k, source.v, source.page_table, ids, counts, q_positions, source.lengths,
      block_size=block_size, scale=scale, interpret=interpret)
  written = jnp.ones((*block_indices.shape[:3], partial_out.shape[0]), bool)
  return sched.combine(partial_out, partial_lse, written, q.dtype)


def _padded(source, block_size):
  """K and V padded to whole blocks, and the block count."""
  nb = reference.cdiv(source.k.shape[1], block_size)
  pad = ((0, 0), (0, nb * block_size - source.k.shape[1]), (0, 0), (0, 0))
  return jnp.pad(source.k, pad), jnp.pad(source.v, pad), nb


# Rows of one work item's tile (query positions x heads of the group): 8 x 16 at M3 shapes.
# The TPU kernel's; the GPU kernel takes its tile from the per-card table (msa_jax.tuning).
TILE_ROWS = 128
# Interpret mode runs the same kernels with smaller tiles: CPU cost grows with the unrolled
# per-row gathers, and small tiles split lists into more items (more schedule edge cases).
INTERPRET_TILE_ROWS = 32


def _queries_per_item(heads_per_group: int, interpret) -> int:
  rows = INTERPRET_TILE_ROWS if interpret else TILE_ROWS
  return max(1, rows // heads_per_group)


def gpu_sparse_kernel(q, k, v, block_size: int, shape: dict | None = None):
  """The GPU KV-outer kernel module for these inputs: the Mosaic GPU one where the card's
  tuning table (at ``shape``) picks it and it supports the shapes, else the Triton one."""
  from msa_jax.ops.sparse_attention import gpu_mosaic, gpu_triton
  if tuning.config("sparse", shape=shape).kernel == "mosaic":  # Hopper TMA + wgmma
    if gpu_mosaic.supports(q, k, v, block_size):
      return gpu_mosaic
  return gpu_triton


def _gpu_kv_outer(q, source, block_indices, q_positions, *, block_size, scale, interpret):
  """KV-outer (schedule -> kernel -> combine), or where neighbouring queries share their
  blocks the union-tile kernel (``tuning``: ``union_max``, ``union_mix``)."""
  from msa_jax.ops.sparse_attention import gpu_mosaic
  from msa_jax.ops.sparse_attention import gpu_mosaic_union as union_kernel
  b, t, hq, _ = q.shape
  g, kv_lengths = source.k.shape[2], source.lengths
  shape = tuning.shape(source.k.shape[1], t)  # the call's, for every table lookup below
  cfg = tuning.config("sparse", shape=shape)
  k, v, nb = _padded(source, block_size)
  valid = reference.valid_block_mask(block_indices, nb)
  kernel = gpu_sparse_kernel(q, k, v, block_size, shape)
  per_tile, per_item = kernel.work_item_size(
      hq // g, tile_rows=INTERPRET_TILE_ROWS if interpret else None, shape=shape)
  guarded = kernel is gpu_mosaic  # its P @ V takes V as loaded: clean it first
  if guarded:
    v, bad_prefix = kernel.guard_values(v, kv_lengths)

  def kv_outer(lo, hi, live):  # queries [lo, hi): schedule -> kernel -> combine
    ids = block_indices[:, lo:hi]
    schedule = sched.build_schedule(ids, live[:, lo:hi], q_positions[:, lo:hi], nb,
                                    per_item)
    partial_out, partial_lse = kernel.sparse_attention_partials(
        q[:, lo:hi], k, v, schedule, kv_lengths, block_size=block_size, scale=scale,
        topk=ids.shape[3], queries_per_tile=per_tile, tiles_per_item=per_item // per_tile,
        shape=shape, interpret=interpret)
    return sched.combine(partial_out, partial_lse, live[:, lo:hi], q.dtype)

  def kv_outer_all(live=valid):
    # Long query ranges in pieces (``query_chunk``): smaller partial buffers (k rows per
    # query), at some speed (on the H200 one piece is fastest, so its table has None).
    piece = cfg.query_chunk or t
    outs = [kv_outer(lo, min(lo + piece, t), live) for lo in range(0, t, piece)]
    return (outs[0] if len(outs) == 1 else
            tuple(jnp.concatenate(parts, axis=1) for parts in zip(*outs)))

  union_max = cfg.union_max or 0
  if guarded and union_max and union_kernel.supports(q, k, v, block_size):
    # Query-outer over tiles of neighbouring queries when they share their blocks (small
    # tile unions, as with a trained indexer's selections): each tile's blocks loaded once,
    # no partials, no combine. KV-outer where they do not.
    unions = union_kernel.tile_unions(block_indices, valid, hq // g)
    union = lambda u: union_kernel.sparse_attention(
        q, k, v, block_indices, valid, q_positions, kv_lengths, block_size=block_size,
        scale=scale, unions=u, interpret=interpret)
    if cfg.union_mix:
      out, lse = _union_per_tile(unions, union_max, union, kv_outer_all, valid, hq // g)
    else:  # per call, by the tiles' mean union
      out, lse = lax.cond(union_kernel.mean_union(unions) <= union_max,
                          lambda: union(unions), kv_outer_all)
  else:
    out, lse = kv_outer_all()
  if guarded:
    out = kernel.poison(out, bad_prefix, block_indices, valid, q_positions, kv_lengths,
                        block_size)
  return out, lse


def _tpu_kv_outer(q, source, block_indices, q_positions, *, block_size, scale, interpret):
  from msa_jax.ops.sparse_attention import tpu as kernel
  k, v, nb = _padded(source, block_size)
  valid = reference.valid_block_mask(block_indices, nb)
  qpi = _queries_per_item(q.shape[2] // k.shape[2], interpret)
  schedule = sched.build_schedule(block_indices, valid, q_positions, nb, qpi)
  partial_out, partial_lse = kernel.sparse_attention_partials(
      q, k, v, schedule, source.lengths, block_size=block_size, scale=scale,
      topk=block_indices.shape[3], queries_per_item=qpi, interpret=interpret)
  return sched.combine(partial_out, partial_lse, valid, q.dtype)


def _union_per_tile(unions, union_max, union, kv_outer, valid, heads):
  """Each tile of queries on the union path if its union has at most ``union_max`` blocks,
  the others KV-outer (``union(unions)`` and ``kv_outer(live)`` run the two paths; tiles
  emptied of blocks cost the union kernel nothing, queries without live slots cost KV-outer
  no work items). When every tile goes one way, only that path runs."""
  from msa_jax.ops.sparse_attention import gpu_mosaic_union as union_kernel
  ids, counts, members = unions
  small = counts <= union_max  # [B, tiles, G]; tiles without blocks count as small
  t = valid.shape[1]
  on_union = jnp.repeat(small, union_kernel.queries_per_tile(heads), axis=1)[:, :t]  # [B,T,G]

  def mixed():
    out_u, lse_u = union((ids, jnp.where(small, counts, 0), members))
    out_k, lse_k = kv_outer(valid & ~on_union[..., None])
    pick = jnp.repeat(on_union, heads, axis=2)  # [B, T, Hq]
    return jnp.where(pick[..., None], out_u, out_k), jnp.where(pick, lse_u, lse_k)

  some_large = jnp.any(~small)
  some_small = jnp.any(small & (counts > 0))
  branch = jnp.where(some_large, jnp.where(some_small, 1, 2), 0)
  return lax.switch(branch, [lambda: union(unions), mixed, kv_outer])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def differentiable(q, k, v, block_indices, q_positions, kv_lengths, block_size, scale, forward,
                   backward, interpret):
  """``forward`` (one of this module's forward passes) over contiguous K/V -> (out, lse); the
  backward kernels of module ``backward`` recompute the probabilities from them."""
  return forward(q, KV(k=k, v=v, lengths=kv_lengths), block_indices, q_positions,
                 block_size=block_size, scale=scale, interpret=interpret)


def _differentiable_fwd(q, k, v, block_indices, q_positions, kv_lengths, block_size, scale,
                        forward, backward, interpret):
  out, lse = differentiable(q, k, v, block_indices, q_positions, kv_lengths, block_size,
                            scale, forward, backward, interpret)
  return (out, lse), (q, k, v, block_indices, q_positions, kv_lengths, out, lse)


def _differentiable_bwd(block_size, scale, forward, backward, interpret, residuals,
                        cotangents):
  del forward
  q, k, v, block_indices, q_positions, kv_lengths, out, lse = residuals
  d_out, d_lse = cotangents
  bwd = importlib.import_module(f"msa_jax.ops.sparse_attention.{backward}")
  dq, dk, dv = bwd.sparse_attention_bwd(q, k, v, block_indices, q_positions, kv_lengths, out,
                                        lse, d_out, d_lse, block_size=block_size, scale=scale,
                                        interpret=interpret)
  return dq, dk, dv, None, None, None


differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)
