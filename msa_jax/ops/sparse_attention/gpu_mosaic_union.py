"""Union-tile block-sparse attention forward for Hopper (Pallas Mosaic GPU: TMA + wgmma).

The same work as ``gpu_triton_union.py`` (Triton): query-outer over tiles of
consecutive queries of one (batch, group), each walking the union of its queries' selected
blocks (``tile_unions``, in XLA) with an online softmax, writing the final output and LSE (no
partials, no combine). Here as a FlashAttention-3-style warp-specialised kernel:

* A CTA takes one tile: ``2 * lanes`` consecutive queries (``lanes = 64 / heads``, 4 for 16
  heads per group) of one (batch, group). Two compute warpgroups, each 64 rows (its ``lanes``
  queries x the group's heads), and one producer warpgroup. Both compute warpgroups consume
  every block of the tile's union, so each block's K/V is loaded once per tile.
* Shared memory: each compute warpgroup's q tile ``[64, D]`` (later its output staging) and
  LSE staging, and a ring of ``num_stages`` K/V slots ``[Bk, D]`` each, (8, 64)-tiled and
  128-byte swizzled as wgmma wants them.
* Producer, per union block u: waits until both compute warpgroups released the slot, then
  one TMA copy each of the block's K and V (``k[b, blk*Bk:(blk+1)*Bk, g, :]``).
* Compute warpgroup, per union block: S = q K^T (wgmma), keys hidden from the rows whose
  query did not select the block (a bit per query, from ``tile_unions``) and from keys after
  the query's last visible key (only when some lane needs it, under a ``lax.cond``); online
  softmax in base 2 (the row max floored at a large negative number, so rows without a
  visible key yet give P = 0, not NaN); P V (wgmma, P from registers); then it releases the
  slot and adds P V to O * alpha. At the end O is normalised, staged in the q tile with the LSE, and
  stored with one TMA copy per query.

Values: as the KV-outer Mosaic kernel, ``P V`` reads V straight from the TMA loads, so the
caller zeroes value rows past the lengths and non-finite ones and poisons the outputs that
see one (``gpu_mosaic.guard_values`` / ``poison``).

Supported (``supports``): bf16/f16, D == Dv a multiple of 64 up to 128, block size a
multiple of 64 up to 256, 64 divisible by the heads per group (8, 16, 32 or 64) and at most
31 queries per tile (the selection bit mask is an int32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from msa_jax import reference
from msa_jax.ops.common import mosaic_gpu as common
from msa_jax.ops.sparse_attention import gpu_mosaic as mgpu
from msa_jax.ops.sparse_attention import gpu_triton_union as union_common

COMPUTE_WGS = 2
ROWS = common.WGMMA_ROWS  # rows of one compute warpgroup


def supports(q, k, v, block_size: int) -> bool:
  heads = q.shape[2] // k.shape[2]
  return (mgpu.supports(q, k, v, block_size) and ROWS % heads == 0
          and COMPUTE_WGS * (ROWS // heads) <= union_common.MAX_QUERIES_PER_TILE)


def queries_per_tile(heads: int) -> int:
  """Queries of one CTA's tile: 64 rows per compute warpgroup."""
  return COMPUTE_WGS * (ROWS // heads)


def smem_bytes(*, stages, head_dim, block_size, itemsize=2) -> int:
  q_tiles = COMPUTE_WGS * ROWS * (head_dim * itemsize + 4)
  return q_tiles + stages * 2 * block_size * head_dim * itemsize


def _kernel(ids_ref, counts_ref, members_ref, last_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
            q_smem, k_smem, v_smem, lse_smem, q_loaded, loaded, consumed, *, stages, lanes,
            heads, block_size, scale, groups, tiles, width):
  bk = block_size
  b, tile, g = lax.axis_index("batch"), lax.axis_index("tile"), lax.axis_index("group")
  wg = lax.axis_index("wg")
  cta = (b * tiles + tile) * groups + g
  count = counts_ref[cta]
  first = cta * width
  queries = tiles * COMPUTE_WGS * lanes  # padded queries per sequence

  def slot_of(u):
    return lax.rem(u, jnp.int32(stages))

  @pl.when(wg == COMPUTE_WGS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def load(u, slot):
      keys = pl.ds(ids_ref[first + u] * bk, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[b, keys, g], k_smem.at[slot], loaded.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, keys, g], v_smem.at[slot], loaded.at[slot])

    common.produce_ring(count, stages, consumed, load)

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    w = wg
    t0 = (tile * COMPUTE_WGS + w) * lanes  # this warpgroup's first query
    q_rows = [(b * queries + t0 + p) * groups + g for p in range(lanes)]
    for p in range(lanes):
      plgpu.copy_gmem_to_smem(q_ref.at[q_rows[p]], q_smem.at[w, pl.ds(p * heads, heads)],
                              q_loaded.at[w])
    last = [last_ref[b, t0 + p] for p in range(lanes)]  # last visible key per query
    c = scale * common.LOG2E
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    row_ids = plgpu.broadcasted_iota(jnp.int32, (ROWS,), 0, layout=row_layout)
    cols = plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 1, layout=plgpu.Layout.WGMMA)
    plgpu.barrier_wait(q_loaded.at[w])

    def step(u, carry):
      acc, m, l = carry
      slot = slot_of(u)
      blk, members = ids_ref[first + u], members_ref[first + u]
      # Per query: the last key of this block it sees, -1 if it did not select the block.
      limits = [jnp.where(lax.shift_right_logical(members, w * lanes + p) & 1 == 1,
                          last[p] - blk * bk, -1) for p in range(lanes)]
      plgpu.barrier_wait(loaded.at[slot])

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem.at[w], plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))

      def mask(s):
        limit = row_ids * 0 + limits[0]
        for p in range(1, lanes):
          limit = jnp.where(row_ids >= p * heads, limits[p], limit)
        visible = cols <= lax.broadcast_in_dim(limit, (ROWS, bk), [0])
        return jnp.where(visible, s, -jnp.inf)

      s = lax.cond(functools.reduce(jnp.minimum, limits) < bk - 1, mask, lambda s: s, s)
      m_new = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp2((m - m_new) * c)
      probs = jnp.exp2(s * c - lax.broadcast_in_dim(m_new * c, (ROWS, bk), [0]))
      l = l * alpha + probs.sum(axis=1)

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, probs.astype(v_smem.dtype), v_smem.at[slot])
        return acc_ref[...]

      # P V into a fresh accumulator, added after (the interpreter has no rule for an
      # accumulator initialised from registers).
      o = pl.run_scoped(pv, plgpu.ACC((ROWS, v_smem.shape[-1]), jnp.float32))
      plgpu.barrier_arrive(consumed.at[slot])
      return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + o, m_new, l

    dv = v_smem.shape[-1]
    init = (plgpu.layout_cast(jnp.zeros((ROWS, dv), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((ROWS,), common.NO_KEYS, jnp.float32), row_layout),
            plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout))
    acc, m, l = lax.fori_loop(0, count, step, init)
    common.stage_output(acc, m, l, q_tile=q_smem.at[w], lse_tile=lse_smem.at[w], scale=scale,
                        dtype=q_smem.dtype)
    for p in range(lanes):
      rows = pl.ds(p * heads, heads)
      plgpu.copy_smem_to_gmem(q_smem.at[w, rows], o_ref.at[q_rows[p]])
      plgpu.copy_smem_to_gmem(lse_smem.at[w, rows], lse_ref.at[q_rows[p]])
    plgpu.wait_smem_to_gmem(0)


def tile_unions(block_indices, valid, heads: int):
  """``gpu_triton_union.tile_unions`` for this kernel's tiles (``heads`` per group)."""
  return union_common.tile_unions(block_indices, valid, queries_per_tile(heads))


def mean_union(unions) -> jax.Array:
  """Mean union size over the tiles that select any block (a traced float32 scalar)."""
  counts = unions[1]
  return jnp.sum(counts) / jnp.maximum(jnp.sum(counts > 0), 1).astype(jnp.float32)


def sparse_attention(q, k, v, block_indices, valid, q_positions, kv_lengths, *, block_size,
                     scale, num_stages=2, unions=None, interpret=False):
  """Exact attention of ``q [B,T,Hq,D]`` over its selected blocks of ``k``/``v`` (padded to
  whole blocks; values already guarded by ``gpu_mosaic.guard_values``), one CTA
  per tile of ``queries_per_tile(heads)`` positions and group. ``unions``: ``tile_unions``'
  result if already computed. Returns ``out [B,T,Hq,Dv]`` and float32 ``lse [B,T,Hq]`` (-inf
  for queries without a visible selected key)."""
  b, t, hq, d = q.shape
  g, dv = k.shape[2], v.shape[-1]
  heads = hq // g
  if not supports(q, k, v, block_size):
    raise ValueError(f"the Mosaic GPU union kernel does not support q {q.shape} {q.dtype}, "
                     f"k {k.shape}, v {v.shape}, block_size {block_size}")
  if num_stages < 2:
    raise ValueError(f"num_stages must be >= 2; got {num_stages}")
  need = smem_bytes(stages=num_stages, head_dim=d, block_size=block_size,
                    itemsize=q.dtype.itemsize)
  if need > common.SMEM_BYTES:
    raise ValueError(f"{need} bytes of shared memory > {common.SMEM_BYTES}: fewer stages")
  lanes = ROWS // heads
  per_tile = COMPUTE_WGS * lanes
  if unions is None:
    unions = tile_unions(block_indices, valid, heads)
  union, counts, members = unions
  tiles, width = union.shape[1], union.shape[-1]
  tp = tiles * per_tile
  last = jnp.minimum(q_positions.astype(jnp.int32), kv_lengths.astype(jnp.int32)[:, None] - 1)
  last = reference._pad_axis(jnp.maximum(last, -1), 1, tp, -1)  # pylint: disable=protected-access
  q_rows = reference._pad_axis(q, 1, tp).reshape(b * tp * g, heads, d)  # pylint: disable=protected-access

  swizzle = 128
  transforms = (plgpu.TilingTransform((8, swizzle // q.dtype.itemsize)),
                plgpu.SwizzleTransform(swizzle))
  scratch = [
      plgpu.SMEM((COMPUTE_WGS, ROWS, d), q.dtype, transforms=transforms),  # q / O staging
      plgpu.SMEM((num_stages, block_size, d), k.dtype, transforms=transforms),
      plgpu.SMEM((num_stages, block_size, dv), v.dtype, transforms=transforms),
      plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.float32),  # LSE staging
      plgpu.Barrier(num_arrivals=lanes, num_barriers=COMPUTE_WGS),  # q tile loaded
      plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),  # K/V slot loaded
      plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=num_stages),  # K/V slot released
  ]
  body = functools.partial(_kernel, stages=num_stages, lanes=lanes, heads=heads,
                           block_size=block_size, scale=float(scale), groups=g, tiles=tiles,
                           width=width)
  kernel_kwargs = dict(
      out_type=(jax.ShapeDtypeStruct((b * tp * g, heads, dv), q.dtype),
                jax.ShapeDtypeStruct((b * tp * g, heads), jnp.float32)),
      scratch_types=scratch,
      grid=(g, tiles, b),
      grid_names=("group", "tile", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=common.compiler_params(),
  )
  params = common.interpret_params(interpret)
  if params is not None:
    kernel_kwargs["interpret"] = params
  out, lse = plgpu.kernel(body, **kernel_kwargs)(
      jnp.maximum(union, 0).reshape(-1), counts.reshape(-1), members.reshape(-1), last,
      q_rows, k, v)
  out = out.reshape(b, tp, hq, dv)[:, :t]
  return out, lse.reshape(b, tp, hq)[:, :t]
