"""Index scoring with the top-k fused, for Hopper (Pallas Mosaic GPU: TMA + wgmma).

Same result as ``index_topk.fused_topk`` (the Triton kernel): the int32 selection
``[B, T, G, topk]``, -1 padded, with nothing but the block ids leaving the kernel. Here the
scoring GEMM runs on wgmma fed by TMA, and the running top-k lives in registers:

* Rows are (query, index head) pairs, ``T * G`` per sequence, in query-major order. A CTA
  takes 128 consecutive rows: two compute warpgroups of 64 rows (one wgmma M each) and one
  producer warpgroup. Grid: (row tiles, batch); the row tiles with the most keys launch
  first (causal prefill: later rows see more blocks).
* Shared memory: each compute warpgroup's q tile ``[64, Di]`` (loaded once) and its rows'
  last visible key (``min(position, kv_len - 1)``, -1 for padding rows); a ring of
  ``num_stages`` key blocks ``[Bk, Di]``, tiled and 128-byte swizzled as wgmma wants them;
  the output ids ``[topk, 64]`` per compute warpgroup.
* Producer, per key block j of the CTA's visible range (up to its last row's last visible
  key): waits until both compute warpgroups have released the ring slot, then one TMA copy
  of the block's index keys into it.
* Compute warpgroup, per block j: waits for the slot, S = q K^T (wgmma, f32 accumulator
  ``[64, Bk]``), releases the slot, masks keys past each row's last visible key (only for
  blocks some row of the tile does not see whole, under a ``lax.cond``), takes the max over
  the block's keys, raises the row's own block to +inf, and inserts the block into the row's
  running top-k: ``topk`` (value, id) pairs per row held in registers, sorted by descending
  value (per entry one compare and four selects). Blocks arrive in ascending id and a new
  block passes only strictly smaller values, so ties go to the lower block id, as in
  ``reference.select_blocks``; -inf (no visible key) and NaN maxima are never inserted.
  While one compute warpgroup runs its epilogue, the other's wgmma keeps the tensor cores
  busy.
* At the end each compute warpgroup writes its ids (-1 where the value is still -inf) to
  shared memory and stores them with one TMA copy to ``out[b, :, rows]`` (ids major, so each
  id slot of the 64 rows is one contiguous row of the staging buffer); XLA transposes.

FP8 (``k_block_scale`` given): q and k in float8_e4m3fn, q with one power-of-two scale per
token and k one per KV block (``reference.fp8_per_token`` / ``fp8_per_block``). The GEMM runs
on FP8 wgmma; a query's scale is left out (a positive factor per row changes no order) and
each block max is multiplied by its block's scale (a positive factor commutes with the max),
one multiply per row and block. (A scale per key would cost a multiply per score, and with
power-of-two scales it rounds the same values: E4M3 rounding commutes with them.)

Supported (``supports``): bf16/f16 index inputs (wgmma), Di a multiple of 64 up to 256,
block size a multiple of 64 up to 256, topk up to 16 (registers); FP8 (``supports_fp8``) Di
a multiple of 128. Anything else: the Triton kernels (``index_topk.py``).

Validation on CPU (``tests/ops/index_topk/test_gpu_mosaic.py``): the Mosaic GPU interpreter runs the
producer and compute warpgroups as threads with barrier-phase and race checks and NaN-filled
memory, against the reference selection; ``jax.export`` for CUDA checks the lowering at M3
shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from msa_jax.ops.index_topk import gpu_triton as index_topk
from msa_jax.ops.common import mosaic_gpu as common
from msa_jax import tuning

WGMMA_ROWS = common.WGMMA_ROWS  # rows of one compute warpgroup (one wgmma M)
COMPUTE_WGS = 2
CTA_ROWS = COMPUTE_WGS * WGMMA_ROWS
MAX_TOPK = 16  # the running top-k takes 4 registers per entry and row pair


def _supported_shape(di: int, block_size: int, topk: int) -> bool:
  return (di % 64 == 0 and di <= 256 and block_size % 64 == 0 and block_size <= 256
          and 1 <= topk <= MAX_TOPK)


def supports(q_idx, k_idx, block_size: int, topk: int) -> bool:
  """Whether this kernel handles these shapes/dtypes (else use the Triton kernels)."""
  return (q_idx.dtype in (jnp.bfloat16, jnp.float16) and k_idx.dtype == q_idx.dtype
          and _supported_shape(q_idx.shape[-1], block_size, topk))


def supports_fp8(q_idx, block_size: int, topk: int) -> bool:
  """Whether index inputs of ``q_idx``'s shape can be scored in float8_e4m3fn here: rows of
  128-byte multiples (the 128-byte swizzle)."""
  di = q_idx.shape[-1]
  return di % 128 == 0 and _supported_shape(di, block_size, topk)


def smem_bytes(*, num_stages, index_dim, block_size, topk, itemsize=2, values=False) -> int:
  """Shared memory the kernel allocates (barriers not included); ``values``: split-K, the
  candidates' values staged too."""
  q_tiles = CTA_ROWS * index_dim * itemsize
  ring = num_stages * block_size * index_dim * itemsize
  return q_tiles + ring + CTA_ROWS * 4 + (1 + values) * COMPUTE_WGS * topk * WGMMA_ROWS * 4


# One function on purpose (longer than most): a Mosaic GPU kernel body whose producer and
# compute warpgroups are branches over the same refs, barriers and item recurrence; each
# branch is a nested function, so the body reads as the protocol the module docstring states.
def _kernel(meta_ref, last_ref, q_ref, k_ref, *refs, stages, block_size, topk, interpreted,
            block_scaled, blocks_per_split):
  if block_scaled:
    bscale_ref, *refs = refs
  with_values = blocks_per_split is not None  # split over key ranges: candidates + values
  if with_values:
    (ids_ref, vals_ref, q_smem, last_smem, k_smem, ids_smem, vals_smem, q_loaded, loaded,
     consumed) = refs
  else:
    ids_ref, q_smem, last_smem, k_smem, ids_smem, q_loaded, loaded, consumed = refs
  bk = block_size
  tile = meta_ref.shape[1] - 1 - lax.axis_index("tile")  # the longest row tiles first
  b = lax.axis_index("batch")
  split = lax.axis_index("split")
  wg = lax.axis_index("wg")
  visible = meta_ref[b, tile, 0]  # key blocks holding a key visible to some row of the CTA
  if with_values:  # this CTA's range of key blocks
    first = split * blocks_per_split
    end = jnp.minimum(first + blocks_per_split, visible)
  else:
    first, end = jnp.int32(0), visible
  steps = jnp.maximum(end - first, 0)

  def slot_of(j):  # ring slot of key block j
    return lax.rem(j - first, jnp.int32(stages))

  @pl.when(wg == COMPUTE_WGS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def load(i, slot):
      plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds((first + i) * bk, bk)], k_smem.at[slot],
                              loaded.at[slot])

    common.produce_ring(steps, stages, consumed, load)

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    w = wg
    row0 = (tile * COMPUTE_WGS + w) * WGMMA_ROWS
    full = meta_ref[b, tile, 1 + w]  # leading blocks every row of this warpgroup sees whole
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, WGMMA_ROWS)], q_smem.at[w],
                            q_loaded.at[w])
    plgpu.copy_gmem_to_smem(last_ref.at[b, pl.ds(row0, WGMMA_ROWS)], last_smem.at[w],
                            q_loaded.at[w])
    plgpu.barrier_wait(q_loaded.at[w])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    if interpreted:  # the Mosaic GPU interpreter has no rule for a load with a layout
      last = last_smem[w]
    else:
      last = plgpu.load(last_smem, (w,), layout=row_layout)  # [64] int32
    zero = last * 0
    own = jnp.where(last >= 0, lax.div(last, jnp.int32(bk)), zero - 1)
    cols = plgpu.broadcasted_iota(jnp.int32, (WGMMA_ROWS, bk), 1, layout=plgpu.Layout.WGMMA)

    def block_scale(j):  # FP8 keys with one scale per block (read one block ahead)
      if not block_scaled:
        return jnp.float32(1)
      return bscale_ref[b, jnp.minimum(j, bscale_ref.shape[1] - 1)]

    def step(j, carry):
      vals, ids, scale_j = carry
      slot = slot_of(j)
      scale_next = block_scale(j + 1)
      plgpu.barrier_wait(loaded.at[slot])

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem.at[w], plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((WGMMA_ROWS, bk), jnp.float32))
      plgpu.barrier_arrive(consumed.at[slot])

      def mask(s):
        limit = lax.broadcast_in_dim(last - j * bk, (WGMMA_ROWS, bk), [0])
        return jnp.where(cols <= limit, s, -jnp.inf)

      s = lax.cond(j >= full, mask, lambda s: s, s)
      block_max = s.max(axis=1)
      if block_scaled:  # a positive factor commutes with the max (and keeps -inf)
        block_max = block_max * scale_j
      new_val = jnp.where(own == j, jnp.inf, block_max)
      new_id = zero + j
      # Insert (new_val, j): entries below it shift down one place. Entry e is passed iff
      # new_val > vals[e] (strictly: an equal value from an earlier, lower block stays
      # ahead), and since the list is sorted these are the last entries.
      passed = [new_val > v for v in vals]
      shift = lambda x, e, new: jnp.where(passed[e - 1], x[e - 1], new) if e else new
      vals = tuple(jnp.where(passed[e], shift(vals, e, new_val), vals[e]) for e in range(topk))
      ids = tuple(jnp.where(passed[e], shift(ids, e, new_id), ids[e]) for e in range(topk))
      return vals, ids, scale_next

    empty = plgpu.layout_cast(jnp.full((WGMMA_ROWS,), -jnp.inf, jnp.float32), row_layout)
    vals, ids, _ = lax.fori_loop(first, jnp.maximum(end, first), step,
                                 ((empty,) * topk, (zero - 1,) * topk, block_scale(first)))
    for e in range(topk):
      ids_smem[w, e] = jnp.where(vals[e] == -jnp.inf, zero - 1, ids[e])
      if with_values:
        vals_smem[w, e] = vals[e]
    plgpu.commit_smem()
    rows = pl.ds(row0, WGMMA_ROWS)
    plgpu.copy_smem_to_gmem(ids_smem.at[w], ids_ref.at[b, split, :, rows])
    if with_values:
      plgpu.copy_smem_to_gmem(vals_smem.at[w], vals_ref.at[b, split, :, rows])
    plgpu.wait_smem_to_gmem(0)


def _geometry(q_idx, k_idx, q_positions, kv_lengths, block_size):
  """Rows padded to whole CTAs; per row its last visible key; per CTA (blocks to walk, and
  per compute warpgroup the blocks all its rows see whole); keys padded to whole blocks."""
  b, t, g, di = q_idx.shape
  s_len = k_idx.shape[1]
  rows = t * g
  rows_pad = -(-rows // CTA_ROWS) * CTA_ROWS
  q_rows = jnp.pad(q_idx.reshape(b, rows, di), ((0, 0), (0, rows_pad - rows), (0, 0)))
  last = jnp.minimum(q_positions.astype(jnp.int32), kv_lengths.astype(jnp.int32)[:, None] - 1)
  last = jnp.maximum(last, -1)
  last = jnp.pad(jnp.repeat(last, g, axis=1), ((0, 0), (0, rows_pad - rows)),
                 constant_values=-1)
  per_wg = last.reshape(b, rows_pad // CTA_ROWS, COMPUTE_WGS, WGMMA_ROWS)
  steps = per_wg.max(axis=(2, 3)) // block_size + 1  # 0 when no row sees a key
  full = (per_wg.min(axis=3) + 1) // block_size
  meta = jnp.concatenate([steps[..., None], full], axis=-1).astype(jnp.int32)
  nb = -(-s_len // block_size)
  if nb * block_size != s_len:
    k_idx = jnp.pad(k_idx, ((0, 0), (0, nb * block_size - s_len), (0, 0)))
  return rows, rows_pad, q_rows, last, meta, k_idx


def fused_topk(q_idx, k_idx, q_positions, kv_lengths, *, block_size, topk, num_stages=None,
               k_block_scale=None, splits=1, interpret=False):
  """The selection, int32 ``[B,T,G,topk]`` (-1 padded): scoring, block max-pool and a
  running top-k in one Mosaic GPU kernel. ``num_stages``: key blocks in flight (default:
  the tuning table's ``mosaic_stages``, ``mosaic_fp8_stages`` for FP8). ``interpret``:
  False (compiled), True or a Mosaic GPU interpret-params object (CPU simulation).

  ``splits``: CTAs per row tile, each over its own range of key blocks (split-K, for few
  rows: decode), each writing its top-k candidates with their values; the final top-k over
  ``splits * topk`` candidates per row runs in ``index_topk.merge_candidates``. 1: the
  running top-k is the selection (prefill).

  FP8: ``q_idx``/``k_idx`` in float8_e4m3fn with ``k_block_scale`` ``[B, S/Bk]`` float32,
  one power-of-two scale per key block (``reference.fp8_per_block``; a query's own scale
  changes no order of its row and is left out): the GEMM runs on FP8 wgmma and each block
  max is multiplied by its block's scale."""
  block_scaled = k_block_scale is not None
  if block_scaled:
    if not (q_idx.dtype == k_idx.dtype == jnp.float8_e4m3fn
            and supports_fp8(q_idx, block_size, topk)):
      raise ValueError(f"the Mosaic GPU index kernel's FP8 scoring needs float8_e4m3fn q_idx/k_idx with "
                       f"index_dim a multiple of 128; got {q_idx.dtype} {q_idx.shape}, "
                       f"{k_idx.dtype}, block_size {block_size}, topk {topk}")
  elif not supports(q_idx, k_idx, block_size, topk):
    raise ValueError(f"the Mosaic GPU index kernel does not support q_idx {q_idx.shape} {q_idx.dtype}, "
                     f"k_idx {k_idx.shape} {k_idx.dtype}, block_size {block_size}, "
                     f"topk {topk}")
  key = "mosaic_fp8_stages" if block_scaled else "mosaic_stages"
  stages = getattr(tuning.config("index", shape=tuning.shape(k_idx.shape[1], q_idx.shape[1]),
                                 **{key: num_stages}), key)
  if stages < 2:
    raise ValueError(f"num_stages must be >= 2; got {stages}")
  b, t, g, di = q_idx.shape
  nb = -(-k_idx.shape[1] // block_size)
  splits = max(1, min(int(splits), nb))
  blocks_per_split = None if splits == 1 else -(-nb // splits)
  need = smem_bytes(num_stages=stages, index_dim=di, block_size=block_size, topk=topk,
                    itemsize=q_idx.dtype.itemsize, values=splits > 1)
  if need > common.SMEM_BYTES:
    raise ValueError(f"{need} bytes of shared memory > {common.SMEM_BYTES}: fewer stages")
  rows, rows_pad, q_rows, last, meta, k_idx = _geometry(q_idx, k_idx, q_positions, kv_lengths,
                                                        block_size)
  swizzle = 128
  transforms = (plgpu.TilingTransform((8, swizzle // q_idx.dtype.itemsize)),
                plgpu.SwizzleTransform(swizzle))
  scratch = [
      plgpu.SMEM((COMPUTE_WGS, WGMMA_ROWS, di), q_idx.dtype, transforms=transforms),
      plgpu.SMEM((COMPUTE_WGS, WGMMA_ROWS), jnp.int32),  # rows' last visible key
      plgpu.SMEM((stages, block_size, di), k_idx.dtype, transforms=transforms),
      plgpu.SMEM((COMPUTE_WGS, topk, WGMMA_ROWS), jnp.int32),  # ids staging
  ]
  out_type = [jax.ShapeDtypeStruct((b, splits, topk, rows_pad), jnp.int32)]
  if blocks_per_split is not None:  # candidates' values too
    scratch.append(plgpu.SMEM((COMPUTE_WGS, topk, WGMMA_ROWS), jnp.float32))
    out_type.append(jax.ShapeDtypeStruct((b, splits, topk, rows_pad), jnp.float32))
  scratch += [
      plgpu.Barrier(num_arrivals=2, num_barriers=COMPUTE_WGS),  # q tile + last keys loaded
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # key block loaded
      plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # key slot released
  ]
  kernel_kwargs = dict(
      out_type=tuple(out_type),
      scratch_types=scratch,
      grid=(rows_pad // CTA_ROWS, splits, b),
      grid_names=("tile", "split", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )
  params = common.interpret_params(interpret)
  if params is not None:
    kernel_kwargs["interpret"] = params
  body = functools.partial(_kernel, stages=stages, block_size=block_size, topk=topk,
                           interpreted=params is not None, block_scaled=block_scaled,
                           blocks_per_split=blocks_per_split)
  scales = [k_block_scale.astype(jnp.float32)] if block_scaled else []
  out = plgpu.kernel(body, **kernel_kwargs)(meta, last, q_rows, k_idx, *scales)
  # [B, splits, topk, rows] -> per row its candidates, split by split (ascending block ranges,
  # each in top-k order: ties keep the lower block id first).
  per_row = lambda x: x[..., :rows].transpose(0, 3, 1, 2).reshape(b, t, g, splits * topk)
  if blocks_per_split is None:
    return per_row(out[0])
  return index_topk.merge_candidates(per_row(out[1]), per_row(out[0]), topk,
                                    interpret=params is not None)
