"""KV-outer block-sparse attention forward for Hopper (Pallas Mosaic GPU: TMA + wgmma).

Same contract as the Triton kernel ``gpu_triton.py`` (inputs, the schedule's item
layout, partial-buffer rows, the scratch row at the end), so ``paths._gpu_kv_outer`` can pick
either (``"kernel"`` in the ``"sparse"`` section of ``msa_jax.tuning``). The Triton kernel is
latency-bound: each tile gathers q, runs two GEMMs and scatters with nothing overlapped. Here
a warp-specialised persistent kernel overlaps them:

* Grid: ``num_ctas`` persistent CTAs (default: one per SM). The schedule's live items (a
  prefix of ``schedule.items``, ``num_items`` long) are cut into equal contiguous chunks, one
  per CTA, so consecutive items of a hot block (same K/V) stay on one SM and hit L2.
* Warpgroups: ``NC = tiles_per_item`` compute warpgroups (1 or 2) + 1 producer warpgroup. An
  item is NC tiles of ``queries_per_tile`` positions x ``Hq/G`` heads = ``R`` rows (64: one
  wgmma M); compute warpgroup ``w`` takes tile ``w`` of every item, against the item's K/V.
* Shared memory, two rings. ``S = num_stages`` (>= 2) q slots, each one q tile ``[R, D]``
  per compute warpgroup and an LSE row buffer ``[R]`` f32 per compute warpgroup;
  ``kv_stages`` (>= 2) K/V slots of K ``[Bk, D]`` and V ``[Bk, D]`` (tiles (8, 64)-tiled,
  128-byte swizzled, as wgmma wants them). M3 shapes, NC = 2: 2 + 2 slots take 192 KB + 1 KB,
  3 q + 2 K/V slots 224 KB + 1.5 KB (they fit because no shared memory is reserved for
  cross-warp reductions, which this kernel has none of).
* K/V loads: item i loads its block's K/V into K/V slot ``i % kv_stages`` (consecutive items
  of a hot block reload it from L2).
* Producer (warpgroup NC), per item i: waits ``kv_consumed`` of its K/V slot (i >=
  ``kv_stages``) and issues K and V
  (``k[b, blk*Bk:(blk+1)*Bk, g, :]``, one strided [Bk, D] slab each) onto ``kv_loaded``;
  then, in q slot s = i % S, waits ``consumed[s]`` (i >= S) and issues, for every live lane,
  the gather of that query's ``[Hq/G, D]`` slab (one contiguous 4 KB copy of
  ``q.reshape(B*T*G, Hq/G, D)[q_row]``) into rows ``lane*Hq/G ...`` of the compute
  warpgroup's q tile onto ``loaded[s]``. Dead lanes (past the item's count) copy nothing and
  arrive on ``loaded[s]`` instead, so its arrival count stays fixed (NC * queries_per_tile).
  After its last item it waits out the last ``consumed`` and ``kv_consumed`` phases (keeps
  every barrier phase observed).
* Compute warpgroup, per item: releases the previous item's K/V slot (its wgmmas have
  completed: their results were read) and waits ``kv_loaded``; waits
  ``loaded[s]``; S = q K^T (wgmma, A and B from shared
  memory, f32 accumulator); while that runs, releases the *previous* item's slot (waits until
  the previous item's output stores have read shared memory, then arrives on ``consumed``);
  causal / length mask from each lane's position and ``kv_len``; exact softmax over the one
  block (no online rescaling); O = P V (wgmma, P from registers); normalise; O goes back into
  the q tile (its q rows are dead) and the LSE into the LSE buffer; per live lane one TMA
  store of the ``[Hq/G, Dv]`` rows to partial row ``out_rows[entry]`` and one of the
  ``[Hq/G]`` LSE values (stores run asynchronously under the next item's math). Dead lanes
  store nothing (the Triton kernel writes them to the scratch row; that row is never read).
  A compute warpgroup whose tile has no live lane skips the math but keeps the barrier
  protocol. The item's scalars (live lanes, per-lane visibility limit and partial row) are
  read one item ahead, under the previous item's wgmmas.
* The causal/length mask runs (under a ``lax.cond``) only for items where some lane does not
  see the whole block.
* Registers: compute warpgroups raise their limit to 232, the producer drops to 40.

Supported (``supports``): bf16/f16 (wgmma has no f32 x f32 with a row-major V), D == Dv a
multiple of 64 and <= 128, block size a multiple of 64 and <= 256, Hq/G a multiple of 8 (TMA
row slices of the tiled q buffer stay tile-aligned). Anything else: use the Triton kernel.

On the H200 it is the sparse kernel of the tuning table (about 1.3x the Triton kernel on the
same chunk; ``benchmarks/NOTES.md`` has the measurements, including the variants tried and
removed: K/V reuse across consecutive items of a block, ping-pong scheduling of the two
compute warpgroups, always masking).

Validation on CPU, ``tests/ops/sparse_attention/test_gpu_mosaic.py``:
* Mosaic GPU interpret mode, jax 0.10.2 (here) and 0.11.2 (the GPU machine's; run from a
  Python 3.12 venv): the producer and compute warpgroups run as concurrent threads, TMA loads
  are simulated and arrive on their barrier, barrier phases are checked (a phase a thread did
  not observe and a double completion raise; a deadlock hangs, which the test's watchdog
  turns into a failure), fresh memory is NaN, and data
  races are detected with vector clocks. 0.11.2 also runs the smem->gmem stores
  asynchronously and race-checks them against the next TMA load of the slot. Validated: the
  barrier protocol, the slot reuse (wgmma reads vs the next TMA load; O/LSE staging writes
  vs the stores and the next load), all row/slot arithmetic, gathers, scatters, masking,
  softmax and results (every written partial slot, combined output vs the float64 oracle, bf16
  tolerance), 8 and 16 heads per group, 1 and 2 compute warpgroups, uneven CTA chunks, and
  the API dispatch. Injected bugs were caught: releasing a slot before its wgmma read it
  (race, both versions), releasing it before the stores read it (race, 0.11.2).
* Interpreter gaps filled by ``interpreter_shims.install`` (interpret mode only): wgmma with
  an operand in registers (P) in both versions; on 0.10.2 also a ``transpose_ref`` operand
  (K^T), race checks of wgmma operand reads, and ``layout_cast`` on CPU (identity).
* Lowering: ``jax.export(..., platforms=["cuda"])`` runs the whole Pallas -> Mosaic GPU
  lowering on CPU at M3 shapes (register layouts, TMA slices of the tiled/swizzled buffers,
  wgmma operand checks) on jax 0.10.2 and 0.11.2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from msa_jax import schedule as sched
from msa_jax.ops.common import mosaic_gpu as common
from msa_jax import tuning

WGMMA_ROWS = common.WGMMA_ROWS


def supports(q, k, v, block_size: int) -> bool:
  """Whether this kernel handles these shapes/dtypes (else use the Triton kernel)."""
  heads = q.shape[2] // k.shape[2]
  d, dv = q.shape[-1], v.shape[-1]
  return (q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype and v.dtype == q.dtype
          and d == dv and d % 64 == 0 and d <= 128 and block_size % 64 == 0
          and block_size <= 256 and heads % 8 == 0)


def _rows_per_tile(heads: int, tile_rows: int) -> int:
  """Queries per tile: ``tile_rows // heads``, raised until the tile is whole wgmma tiles."""
  per_tile = max(1, tile_rows // heads)
  while (per_tile * heads) % WGMMA_ROWS:
    per_tile += 1
  return per_tile


def work_item_size(heads: int, tile_rows: int | None = None, tiles_per_item: int | None = None,
                   shape: dict | None = None) -> tuple[int, int]:
  """(queries per tile, entries per work item); as ``sparse_attention.work_item_size``.

  ``tiles_per_item`` is the number of compute warpgroups (1 or 2): each takes one tile of
  every item. Tiles are rounded up to a multiple of 64 rows (one wgmma M).
  """
  cfg = tuning.config("sparse_mosaic", shape=shape, tile_rows=tile_rows,
                      tiles_per_item=tiles_per_item)
  per_tile = _rows_per_tile(heads, cfg.tile_rows)
  return per_tile, per_tile * cfg.tiles_per_item


# One function on purpose (longer than most): a Mosaic GPU kernel body whose producer and
# compute warpgroups are branches over the same refs, barriers and item recurrence; each
# branch is a nested function, so the body reads as the protocol the module docstring states.
def _kernel(items_ref, num_items_ref, q_rows_ref, out_rows_ref, pos_ref, kv_len_ref, q_ref,
            k_ref, v_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, loaded, consumed,
            kv_loaded, kv_consumed, *, num_ctas, stages, kv_stages, compute_wgs,
            queries_per_tile, heads, block_size, scale):
  qpt, nc, h, bk = queries_per_tile, compute_wgs, heads, block_size
  rows = qpt * h
  dtype = q_smem.dtype
  wg = lax.axis_index("wg")

  # This CTA's contiguous chunk of the live items (they form a prefix of the item list).
  total = num_items_ref[0]
  chunk = lax.div(total + (num_ctas - 1), jnp.int32(num_ctas))
  first = lax.axis_index("cta") * chunk
  n = jnp.clip(total - first, 0, chunk)

  def slot_of(i):
    return lax.rem(i, jnp.int32(stages))

  def kv_slot_of(i):
    return lax.rem(i, jnp.int32(kv_stages))

  def field(item, f):
    return items_ref[item, f]

  @pl.when(wg == nc)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def produce(i, carry):
      slot, kv_slot = slot_of(i), kv_slot_of(i)
      # Scalars first: their latency overlaps the wait for the slot.
      item = first + i
      b, g, blk = field(item, sched.ITEM_BATCH), field(item, sched.ITEM_GROUP), field(
          item, sched.ITEM_BLOCK)
      start, count = field(item, sched.ITEM_START), field(item, sched.ITEM_COUNT)
      q_rows = [q_rows_ref[start + lane] for lane in range(nc * qpt)]  # padded: in range

      @pl.when(i >= kv_stages)
      def _():
        plgpu.barrier_wait(kv_consumed.at[kv_slot])

      keys = pl.ds(blk * bk, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[b, keys, g], k_smem.at[kv_slot], kv_loaded.at[kv_slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, keys, g], v_smem.at[kv_slot], kv_loaded.at[kv_slot])

      @pl.when(i >= stages)
      def _():
        plgpu.barrier_wait(consumed.at[slot])

      for w in range(nc):
        for p in range(qpt):
          lane = w * qpt + p
          live = lane < count

          @pl.when(live)
          def _():
            plgpu.copy_gmem_to_smem(q_ref.at[q_rows[lane]],
                                    q_smem.at[slot, w, pl.ds(p * h, h)], loaded.at[slot])

          @pl.when(jnp.logical_not(live))
          def _():  # nothing to gather: arrive in place of the copy
            plgpu.barrier_arrive(loaded.at[slot])
      return carry

    lax.fori_loop(0, n, produce, 0)

    def drain(i, carry):  # observe the last releases, so no barrier phase goes unobserved
      plgpu.barrier_wait(consumed.at[slot_of(i)])
      return carry

    lax.fori_loop(jnp.maximum(n - stages, 0), n, drain, 0)

    def drain_kv(i, carry):
      plgpu.barrier_wait(kv_consumed.at[kv_slot_of(i)])
      return carry

    lax.fori_loop(jnp.maximum(n - kv_stages, 0), n, drain_kv, 0)

  @pl.when(wg < nc)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    w = wg

    def release_previous(j):
      """Hand item j-1's slot back once its output stores have read shared memory."""
      @pl.when(j > 0)
      def _():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.barrier_arrive(consumed.at[slot_of(j - 1)])

    def read_item(j):
      """The scalars item j needs: (live lanes, per lane the block-local last visible key
      and the partial row to write). j is clamped into the chunk (a prefetch past the last
      item reads the last one; entries are padded, so every read is in range)."""
      item = jnp.clip(first + jnp.minimum(j, n - 1), 0, items_ref.shape[0] - 1)
      b, blk = field(item, sched.ITEM_BATCH), field(item, sched.ITEM_BLOCK)
      start, count = field(item, sched.ITEM_START), field(item, sched.ITEM_COUNT)
      kv_len = kv_len_ref[b]
      entry0 = start + w * qpt
      limits = [jnp.minimum(pos_ref[entry0 + p], kv_len - 1) - blk * bk for p in range(qpt)]
      out_rows = [out_rows_ref[entry0 + p] for p in range(qpt)]
      return (jnp.clip(count - w * qpt, 0, qpt), *limits, *out_rows)

    def issue_stores(slot, live_lanes, *out_rows):
      """One TMA store of the staged O rows and one of the LSE rows per live lane."""
      for p in range(qpt):
        @pl.when(p < live_lanes)
        def _():
          lanes = pl.ds(p * h, h)
          plgpu.copy_smem_to_gmem(q_smem.at[slot, w, lanes], o_ref.at[out_rows[p]])
          plgpu.copy_smem_to_gmem(lse_smem.at[slot, w, lanes], lse_ref.at[out_rows[p]])

    tile = dict(heads=h, rows=rows, block_size=bk, scale=scale, dtype=dtype)

    def consume(j, scalars):
      slot, kv_slot = slot_of(j), kv_slot_of(j)
      # This item's scalars were read during the previous item; read the next item's now, so
      # their global-memory latency hides under this item's wgmmas.
      (live_lanes, *rest), scalars = scalars, read_item(j + 1)
      limits, out_rows = rest[:qpt], rest[qpt:]

      @pl.when(j > 0)
      def _():  # the previous item's wgmmas are complete (their results were read)
        plgpu.barrier_arrive(kv_consumed.at[kv_slot_of(j - 1)])

      plgpu.barrier_wait(kv_loaded.at[kv_slot])
      plgpu.barrier_wait(loaded.at[slot])

      @pl.when(live_lanes > 0)
      def _():
        _attend_tile(q_tile=q_smem.at[slot, w], k_tile=k_smem.at[kv_slot],
                     v_tile=v_smem.at[kv_slot], lse_tile=lse_smem.at[slot, w], limits=limits,
                     under_qk=lambda: release_previous(j), **tile)
        issue_stores(slot, live_lanes, *out_rows)  # they run under the next item's math

      @pl.when(live_lanes <= 0)
      def _():
        release_previous(j)
      return scalars

    lax.fori_loop(0, n, consume, read_item(0))

    @pl.when(n > 0)
    def _():
      plgpu.wait_smem_to_gmem(0)
      plgpu.barrier_arrive(consumed.at[slot_of(n - 1)])
      plgpu.barrier_arrive(kv_consumed.at[kv_slot_of(n - 1)])


def _attend_tile(*, q_tile, k_tile, v_tile, lse_tile, limits, under_qk, heads, rows,
                 block_size, scale, dtype):
  """One tile: S = q K^T, softmax over the block, O = P V; O and LSE staged in shared memory
  (O in the q tile, whose rows are dead) for the caller's stores. ``under_qk`` runs while the
  QK wgmma does."""

  def qk(acc_ref):
    plgpu.wgmma(acc_ref, q_tile, plgpu.transpose_ref(k_tile, (1, 0)))
    under_qk()  # overlaps the wgmma
    return acc_ref[...]

  s = pl.run_scoped(qk, plgpu.ACC((rows, block_size), jnp.float32))
  m, l, p16 = _softmax(s, limits=limits, heads=heads, rows=rows, block_size=block_size,
                       scale=scale, dtype=dtype)

  def pv(acc_ref):
    plgpu.wgmma(acc_ref, p16, v_tile)
    return acc_ref[...]

  o = pl.run_scoped(pv, plgpu.ACC((rows, v_tile.shape[-1]), jnp.float32))
  common.stage_output(o, m, l, q_tile=q_tile, lse_tile=lse_tile, scale=scale, dtype=dtype)


def _softmax(s, *, limits, heads, rows, block_size, scale, dtype):
  """(row max, row sum, P in ``dtype``) of the exact softmax of ``s`` over one block.

  Key c of the block is visible to lane p (rows ``p*heads ...``) iff c <= limits[p]. Base 2,
  the scale folded into one multiply; the row max is floored at ``common.NO_KEYS`` so a row without
  a visible key gives P = 0 and sum 0, not NaN."""
  def mask(s):
    row_ids = plgpu.broadcasted_iota(jnp.int32, (rows,), 0,
                                     layout=plgpu.Layout.WGMMA.reduce(1))
    limit = row_ids * 0 + limits[0]
    for p in range(1, len(limits)):
      limit = jnp.where(row_ids >= p * heads, limits[p], limit)
    cols = plgpu.broadcasted_iota(jnp.int32, (rows, block_size), 1,
                                  layout=plgpu.Layout.WGMMA)
    visible = cols <= lax.broadcast_in_dim(limit, (rows, block_size), [0])
    return jnp.where(visible, s, -jnp.inf)

  # Most items see their whole block: mask only where a lane needs it.
  needed = functools.reduce(jnp.minimum, limits) < block_size - 1
  s = lax.cond(needed, mask, lambda s: s, s)
  c = scale * common.LOG2E
  m = jnp.maximum(s.max(axis=1), common.NO_KEYS)
  probs = jnp.exp2(s * c - lax.broadcast_in_dim(m * c, (rows, block_size), [0]))
  return m, probs.sum(axis=1), probs.astype(dtype)


def guard_values(v, kv_lengths):
  """V as this kernel may read it, and what ``poison`` needs.

  The kernel's ``P @ V`` reads V straight from the TMA loads, so ``0 * NaN`` would reach rows
  whose P is 0 there. Here (in XLA, one pass over V) value rows past ``kv_lengths`` and
  non-finite rows are zeroed, as the Triton kernel does per block (``ops/common/masking.py``).
  Returns (V ``[B,S,G,Dv]``, int32 ``[B,G,S+1]`` prefix counts of non-finite rows before
  ``kv_lengths``).
  """
  s = v.shape[1]
  live = jnp.arange(s)[None, :, None] < kv_lengths[:, None, None]  # [B, S, 1]
  finite = jnp.all(jnp.isfinite(v), axis=-1)  # [B, S, G]
  v = jnp.where((live & finite)[..., None], v, jnp.zeros((), v.dtype))
  bad = (live & ~finite).astype(jnp.int32)
  return v, jnp.pad(jnp.cumsum(bad, axis=1), ((0, 0), (1, 0), (0, 0))).transpose(0, 2, 1)


def poison(out, bad_prefix, block_indices, valid, q_positions, kv_lengths, block_size):
  """``out [B,T,Hq,Dv]`` with NaN for the queries that see a non-finite value (counted by
  ``guard_values``) in one of their selected blocks, as exact attention gives."""
  b, t, hq, _ = out.shape
  g, n = bad_prefix.shape[1], bad_prefix.shape[2]
  lo = jnp.clip(block_indices, 0) * block_size  # [B, T, G, k]
  hi = jnp.minimum(lo + block_size - 1, jnp.minimum(q_positions[:, :, None, None],
                                                    kv_lengths[:, None, None, None] - 1))
  rows = jnp.arange(b)[:, None, None, None]
  groups = jnp.arange(g)[None, None, :, None]
  count = lambda i: bad_prefix[rows, groups, jnp.clip(i, 0, n - 1)]
  sees = valid & (hi >= lo) & (count(hi + 1) > count(lo))
  sees = jnp.repeat(jnp.any(sees, axis=-1), hq // g, axis=2)  # [B, T, Hq]
  return jnp.where(sees[..., None], jnp.nan, out)


def smem_bytes(*, stages, compute_wgs, rows, head_dim, block_size, itemsize=2,
               kv_stages=None) -> int:
  """Shared memory the kernel allocates (barriers and Mosaic's own scratch not included):
  ``stages`` q/O slots and ``kv_stages`` (default ``stages``) K/V slots."""
  kv_stages = stages if kv_stages is None else kv_stages
  q_slot = compute_wgs * rows * (head_dim * itemsize + 4)  # q tiles / O staging, LSE staging
  return stages * q_slot + kv_stages * 2 * block_size * head_dim * itemsize


def sparse_attention_partials(q, k, v, schedule: sched.Schedule, kv_lengths, *, block_size,
                              scale, topk, queries_per_tile, tiles_per_item=1, num_stages=None,
                              kv_stages=None, num_ctas=None, shape=None, interpret=False):
  """Run the Mosaic GPU KV-outer kernel: partial_out [k,B,T,Hq,Dv], partial_lse [k,B,T,Hq].

  As ``sparse_attention.sparse_attention_partials``: ``schedule`` built with
  ``queries_per_tile * tiles_per_item`` entries per item (``work_item_size``);
  ``tiles_per_item`` is the number of compute warpgroups; ``num_stages`` q/O slots and
  ``kv_stages`` K/V slots, ``num_ctas`` persistent CTAs (unset ones come from the tuning
  table). ``interpret``: False (compiled),
  True or a Mosaic GPU interpret-params object (CPU simulation). Unwritten partial slots hold
  garbage, as with the Triton kernel (``combine`` selects by ``valid``).
  """
  cfg = tuning.config("sparse_mosaic", shape=shape or tuning.shape(k.shape[1], q.shape[1]),
                      num_stages=num_stages, kv_stages=kv_stages, num_ctas=num_ctas)
  b, t, hq, d = q.shape
  g = k.shape[2]
  dv = v.shape[-1]
  heads = hq // g
  rows = queries_per_tile * heads
  stages, kv_stages = cfg.num_stages, cfg.kv_stages
  if not supports(q, k, v, block_size):
    raise ValueError(f"the Mosaic GPU sparse kernel does not support q {q.shape} {q.dtype}, "
                     f"k {k.shape}, v {v.shape}, block_size {block_size}")
  if rows % WGMMA_ROWS or tiles_per_item not in (1, 2) or stages < 2 or kv_stages < 2:
    raise ValueError(f"need tile rows ({rows}) a multiple of {WGMMA_ROWS}, tiles_per_item "
                     f"(compute warpgroups, {tiles_per_item}) 1 or 2, num_stages and "
                     f"kv_stages >= 2")
  need = smem_bytes(stages=stages, compute_wgs=tiles_per_item, rows=rows, head_dim=d,
                    block_size=block_size, itemsize=q.dtype.itemsize, kv_stages=kv_stages)
  if need > common.SMEM_BYTES:
    raise ValueError(f"{need} bytes of shared memory > {common.SMEM_BYTES}: fewer rows or stages")
  params = common.interpret_params(interpret)
  num_ctas = cfg.num_ctas or common.num_sms()
  num_ctas = max(1, min(num_ctas, schedule.max_items))
  rows_out = topk * b * t * g

  swizzle = 128
  tile = (8, swizzle // q.dtype.itemsize)
  transforms = (plgpu.TilingTransform(tile), plgpu.SwizzleTransform(swizzle))
  nc = tiles_per_item
  scratch = [
      plgpu.SMEM((stages, nc, rows, d), q.dtype, transforms=transforms),  # q tiles / O staging
      plgpu.SMEM((kv_stages, block_size, d), k.dtype, transforms=transforms),
      plgpu.SMEM((kv_stages, block_size, dv), v.dtype, transforms=transforms),
      plgpu.SMEM((stages, nc, rows), jnp.float32),  # LSE staging
      plgpu.Barrier(num_arrivals=nc * queries_per_tile, num_barriers=stages),  # q loaded
      plgpu.Barrier(num_arrivals=nc, num_barriers=stages),  # q slot consumed
      plgpu.Barrier(num_arrivals=2, num_barriers=kv_stages),  # K/V loaded
      plgpu.Barrier(num_arrivals=nc, num_barriers=kv_stages),  # K/V slot consumed
  ]
  body = functools.partial(_kernel, num_ctas=num_ctas, stages=stages, kv_stages=kv_stages,
                           compute_wgs=nc,
                           queries_per_tile=queries_per_tile, heads=heads,
                           block_size=block_size, scale=float(scale))
  kernel_kwargs = dict(
      out_type=(jax.ShapeDtypeStruct((rows_out + 1, heads, dv), q.dtype),
                jax.ShapeDtypeStruct((rows_out + 1, heads), jnp.float32)),
      scratch_types=scratch,
      grid=(num_ctas,),
      grid_names=("cta",),
      num_threads=nc + 1,
      thread_name="wg",
      compiler_params=common.compiler_params(),
  )
  if params is not None:
    kernel_kwargs["interpret"] = params
  partial_out, partial_lse = plgpu.kernel(body, **kernel_kwargs)(
      schedule.items, schedule.num_items.reshape(1).astype(jnp.int32), schedule.q_rows,
      schedule.out_rows, schedule.positions, kv_lengths.astype(jnp.int32),
      q.reshape(b * t * g, heads, d), k, v)
  partial_out = partial_out[:rows_out].reshape(topk, b, t, hq, dv)
  partial_lse = partial_lse[:rows_out].reshape(topk, b, t, hq)
  return partial_out, partial_lse
