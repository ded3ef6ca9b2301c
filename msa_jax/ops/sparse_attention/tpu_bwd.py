"""Backward of block-sparse attention for TPUs (Pallas, Mosaic TPU).

Given the forward's ``out`` and ``lse`` and the cotangents ``d_out`` (and optionally
``d_lse``), recompute each selected (query, block) pair's probabilities
``p = exp(scale * q.k - lse)`` on the block's visible keys and form
``ds = p * (d_out.v - Delta)`` with ``Delta = rowsum(d_out * out) - d_lse`` (docs/msa.md §6,
backward). Two Pallas calls, both driven by tables in SMEM (scalar prefetch):

* **dQ, query-outer.** Grid ``(B, T, G, topk)``, the last axis ``"arbitrary"`` (a reduction).
  One (b, t, g) is the ``Hq/G`` rows of one query position; its valid block ids are compacted
  to a prefix beforehand (``-1`` slots and repeats dropped) and scalar-prefetched, and the
  K/V ``BlockSpec`` index_maps read ``ids[b, t, g, slot]``, so the auto-pipeline fetches the
  selected ``[Bk, D]`` block for each slot (splash attention's idiom). Slots past the count
  repeat the last valid id, so the pipeline fetches nothing new and ``pl.when`` skips the
  compute. ``dq += ds k`` accumulates in a float32 VMEM scratch and is written once, at the
  last slot. Queries without a block (padding) get exact zeros.
* **dK/dV, KV-outer** over ``schedule.build_schedule``'s inverse map, one grid step per work
  item of at most ``queries_per_item`` entries (one tile of ``queries_per_item * Hq/G``
  rows). The work table is rebuilt here so that it is *list-complete*: every
  (batch, group, block) list has at least one item (an empty item for a block nobody
  selected), the items of a list are consecutive, and each carries first/last flags. The
  table drives the K/V input and the dK/dV output index_maps; q and d_out rows are gathered
  by manual DMA into VMEM tiles (as the forward gathers q). Because a TPU core runs the grid
  in order, a list's items accumulate ``dv += p^T d_out`` and ``dk += ds^T q`` (over all of
  the group's query heads) in float32 VMEM scratch: zeroed at the list's first item, written
  to the output block in the input dtype at its last item. Consecutive items of one list keep
  the same K/V and output block indices, so the pipeline neither refetches the K/V block nor
  writes the output back in between. Every output block is written exactly once, an
  unselected block with exact zeros; no partial buffer, no reduce pass, no atomics, and the
  summation order is fixed (deterministic). The grid axis is ``"arbitrary"`` (revisited output
  blocks), so it runs on one TensorCore. The GPU kernel needs per-item partials and a reduce
  to spread hot lists over SMs; a TensorCore walks its grid sequentially anyway, so summing
  a list in place costs no parallelism (except the second core of a megacore chip).

Layout choices for Mosaic. dQ works in ``[Hq/G, Bk]`` orientation with its ``lse``/``Delta``
as a lane row ``[2, Hq/G]`` block turned into columns by ``expand_dims`` (splash's dQ
kernel). dK/dV works transposed, ``s^T = k q^T`` of shape ``[Bk, rows]`` (splash's dK/dV
kernel), so ``p^T d_out`` and ``ds^T q`` are plain matmuls without transposes and the per-row
statistics are a lane row: they are gathered in XLA into item order, ``[items, 2, rows]``
(``lse``, ``Delta``) and ``[items, 1, rows]`` (each row's last visible key,
``min(position, kv_len - 1)``; -1 for lanes past the item's count), read through a
``BlockSpec`` indexed by the grid step (``12 * B*T*Hq*topk`` bytes, about 2% of the bytes
the q/d_out gathers move at D = 128 in bf16). Gathering them per row in the kernel would take
tiny DMAs into unaligned lane offsets; q and d_out rows (``[Hq/G, D]`` each) are what is worth
a DMA, issued in a loop over the item's live entries (started together, then awaited).
K/V (and dK/dV) are laid out head-major ``[B, G, S, D]`` so a block is one ``[Bk, D]`` tile.

Shape restrictions when compiling for a TPU (not in interpret mode): ``block_size`` must be a
multiple of the sublane tile (8 for 32-bit, 16 for 16-bit dtypes), and when
``queries_per_item > 1`` so must ``Hq/G`` (the gathered ``[queries, Hq/G, D]`` tile is viewed
as ``[rows, D]``); otherwise ``queries_per_item`` defaults to 1. The SMEM tables hold
``B*T*G*topk`` entries, like the forward's: very long sequences are meant to be processed in
query chunks. Only interpret mode has been run (no TPU was available).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from msa_jax import reference
from msa_jax.ops.sparse_attention import backward
from msa_jax import schedule as sched

# Rows of one dK/dV tile (query positions x heads of the group): 8 x 16 at M3 shapes, the
# forward's tile (paths.TILE_ROWS); interpret mode uses smaller tiles (paths.INTERPRET_TILE_ROWS).
TILE_ROWS = 128
INTERPRET_TILE_ROWS = 32

# Columns of the list-complete dK/dV work table (flattened into SMEM).
W_BATCH, W_GROUP, W_BLOCK, W_START, W_COUNT, W_FIRST, W_LAST = range(7)
W_FIELDS = 7


def _precision(x):
  return lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def _dot_nt(a, b):
  """a @ b.T with fp32 accumulation."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a),
                         preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  """a @ b with fp32 accumulation."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a),
                         preferred_element_type=jnp.float32)


def _sublane_tile(dtype) -> int:
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


# ----------------------------------------------------------------------------- dQ


def _dq_kernel(ids_ref, counts_ref, last_key_ref,  # scalar prefetch
               q_ref, k_ref, v_ref, do_ref, stats_ref,  # inputs
               dq_ref,  # output
               acc_ref,  # scratch
               *, topk, block_size, scale, q_len, groups):
  b, t, g, slot = (pl.program_id(a) for a in range(4))
  query = (b * q_len + t) * groups + g

  @pl.when(slot == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(slot < counts_ref[query])
  def _():
    blk = ids_ref[query * topk + slot]
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    lse = jnp.expand_dims(stats_ref[0], -1)  # [Hq/G, 1]
    delta = jnp.expand_dims(stats_ref[1], -1)
    key_pos = blk * block_size + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
    visible = key_pos <= last_key_ref[b * q_len + t]
    s = _dot_nt(q, k) * scale  # [Hq/G, Bk]
    # lse is +inf for rows without a visible key, so p = 0 there even before the mask.
    p = jnp.where(visible, jnp.exp(s - lse), 0.0)
    ds = p * (_dot_nt(do, v) - delta)
    acc_ref[...] += _dot_nn(ds.astype(k.dtype), k)

  @pl.when(slot == topk - 1)
  def _():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dq(q, k_t, v_t, d_out, stats, block_indices, valid, last_key, *, block_size, scale,
        interpret):
  b, t, hq, d = q.shape
  g = k_t.shape[1]
  dv_dim = v_t.shape[-1]
  heads = hq // g
  topk = block_indices.shape[-1]

  # Valid slots first (stable); slots past the count repeat the last valid id (no refetch).
  order = jnp.argsort(~valid, axis=-1, stable=True)
  ids = jnp.take_along_axis(jnp.where(valid, block_indices, 0), order, axis=-1)
  counts = jnp.sum(valid, axis=-1, dtype=jnp.int32)
  last = jnp.take_along_axis(ids, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  ids = jnp.where(jnp.arange(topk) < counts[..., None], ids, last).astype(jnp.int32)

  def kv_index(bi, ti, gi, si, ids_ref, *_):
    return (bi, gi, ids_ref[((bi * t + ti) * g + gi) * topk + si], 0)

  def rows_spec(*tail):
    return pl.BlockSpec((None, None, None, *tail),
                        lambda bi, ti, gi, si, *_: (bi, ti, gi, *(0,) * len(tail)))

  kernel = functools.partial(_dq_kernel, topk=topk, block_size=block_size, scale=scale,
                             q_len=t, groups=g)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(b, t, g, topk),
      in_specs=[
          rows_spec(heads, d),
          pl.BlockSpec((None, None, block_size, d), kv_index),
          pl.BlockSpec((None, None, block_size, dv_dim), kv_index),
          rows_spec(heads, dv_dim),
          rows_spec(2, heads),
      ],
      out_specs=rows_spec(heads, d),
      scratch_shapes=[pltpu.VMEM((heads, d), jnp.float32)],
  )
  grouped = lambda x: x.reshape(b, t, g, heads, *x.shape[3:])
  dq = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, t, g, heads, d), q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="msa_sparse_attention_bwd_dq",
  )(ids.reshape(-1), counts.reshape(-1), last_key.reshape(-1), grouped(q), k_t, v_t,
    grouped(d_out), stats)
  return dq.reshape(b, t, hq, d)


# ----------------------------------------------------------------------------- dK / dV


def _list_complete_items(schedule: sched.Schedule, groups: int, num_blocks: int,
                         num_lists: int, num_entries: int, queries_per_item: int):
  """List-complete work table, int32 ``[items, W_FIELDS]``.

  Every (batch, group, block) list gets ``max(1, cdiv(entries, queries_per_item))``
  consecutive items in list order (the schedule's entries are sorted by list), so a block
  nobody selected still has one (empty) item that writes its zeros. Unused trailing items
  have count 0 and no flags and repeat the last list's indices (no writes, no fetches).
  """
  items = schedule.items
  owner = ((items[:, sched.ITEM_BATCH] * groups + items[:, sched.ITEM_GROUP]) * num_blocks
           + items[:, sched.ITEM_BLOCK])
  counts = jax.ops.segment_sum(items[:, sched.ITEM_COUNT], owner, num_segments=num_lists)
  list_start = jnp.cumsum(counts) - counts
  per_list = jnp.maximum(1, -(-counts // queries_per_item))
  ends = jnp.cumsum(per_list)
  max_items = num_lists + reference.cdiv(num_entries, queries_per_item)
  item = jnp.arange(max_items, dtype=jnp.int32)
  owner = jnp.minimum(jnp.searchsorted(ends, item, side="right"), num_lists - 1)
  piece = item - (ends[owner] - per_list[owner])
  live = item < ends[-1]
  start = jnp.where(live, list_start[owner] + piece * queries_per_item, 0)
  count = jnp.where(live, jnp.clip(counts[owner] - piece * queries_per_item, 0,
                                   queries_per_item), 0)
  first = live & (piece == 0)
  last = live & (piece == per_list[owner] - 1)
  table = jnp.stack([owner // (groups * num_blocks), (owner // num_blocks) % groups,
                     owner % num_blocks, start, count, first, last], axis=1)
  return table.astype(jnp.int32)


def _dkv_kernel(work_ref, q_rows_ref,  # scalar prefetch
                q_hbm, k_ref, v_ref, do_hbm, stats_ref, last_key_ref,  # inputs
                dk_ref, dv_ref,  # outputs
                q_tile, do_tile, dk_acc, dv_acc, q_sems, do_sems,  # scratch
                *, queries_per_item, heads, block_size, scale):
  base = pl.program_id(0) * W_FIELDS
  blk = work_ref[base + W_BLOCK]
  start = work_ref[base + W_START]
  count = work_ref[base + W_COUNT]

  @pl.when(work_ref[base + W_FIRST] == 1)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def copies(r):
    row = q_rows_ref[start + r]
    return (pltpu.make_async_copy(q_hbm.at[row], q_tile.at[r], q_sems.at[r]),
            pltpu.make_async_copy(do_hbm.at[row], do_tile.at[r], do_sems.at[r]))

  def for_live_lanes(action):
    # A loop with a dynamic trip count: lanes past the count move nothing.
    def lane(r, carry):
      for c in copies(r):
        action(c)
      return carry
    lax.fori_loop(0, count, lane, 0)

  @pl.when(count > 0)
  def _():
    for_live_lanes(lambda c: c.start())
    rows = queries_per_item * heads
    key_pos = blk * block_size + lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)
    visible = key_pos <= last_key_ref[...]  # [Bk, rows]; lanes past the count see nothing
    lse = stats_ref[0:1, :]  # [1, rows]; +inf past the count and for rows with no key
    delta = stats_ref[1:2, :]
    # Rows past the count hold stale (or uninitialised) data: zero them, as 0 * NaN = NaN.
    live = lax.broadcasted_iota(jnp.int32, (rows, 1), 0) < count * heads
    for_live_lanes(lambda c: c.wait())
    q = jnp.where(live, q_tile[...].reshape(rows, q_tile.shape[-1]), 0)
    do = jnp.where(live, do_tile[...].reshape(rows, do_tile.shape[-1]), 0)
    k, v = k_ref[...], v_ref[...]
    s = _dot_nt(k, q) * scale  # [Bk, rows]
    p = jnp.where(visible, jnp.exp(s - lse), 0.0)
    ds = p * (_dot_nt(v, do) - delta)
    dv_acc[...] += _dot_nn(p.astype(do.dtype), do)
    dk_acc[...] += _dot_nn(ds.astype(q.dtype), q)

  @pl.when(work_ref[base + W_LAST] == 1)
  def _():
    dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dkv(q, k_t, v_t, d_out, lse, delta, block_indices, valid, q_positions, kv_lengths, *,
         block_size, scale, queries_per_item, interpret):
  b, t, hq, d = q.shape
  g, s_pad = k_t.shape[1], k_t.shape[2]
  dv_dim = v_t.shape[-1]
  heads = hq // g
  nb = s_pad // block_size
  num_lists = b * g * nb
  num_entries = b * t * g * block_indices.shape[-1]
  qpi = queries_per_item
  rows = qpi * heads
  schedule = sched.build_schedule(block_indices, valid, q_positions, nb, qpi)
  work = _list_complete_items(schedule, g, nb, num_lists, num_entries, qpi)

  # Per-lane statistics in item order: lane j of an item is entry start + j // heads, head
  # j % heads. Lanes past the count: lse = +inf, Delta = 0, last key -1 (nothing visible).
  lane = jnp.arange(rows, dtype=jnp.int32)
  entry = work[:, W_START, None] + lane // heads  # [items, rows]
  lane_live = lane // heads < work[:, W_COUNT, None]
  q_row = schedule.q_rows[entry]
  head = jnp.broadcast_to(lane % heads, entry.shape)
  by_row = lambda x: x.reshape(b * t * g, heads)
  lse_lanes = jnp.where(lane_live, by_row(lse)[q_row, head], jnp.inf)
  delta_lanes = jnp.where(lane_live, by_row(delta)[q_row, head], 0.0)
  last_key = jnp.minimum(schedule.positions[entry], kv_lengths[work[:, W_BATCH, None]] - 1)
  last_key = jnp.where(lane_live, last_key, -1)[:, None, :].astype(jnp.int32)
  stats = jnp.stack([lse_lanes, delta_lanes], axis=1)  # [items, 2, rows]

  def kv_index(i, work_ref, *_):
    base = i * W_FIELDS
    return (work_ref[base + W_BATCH], work_ref[base + W_GROUP], work_ref[base + W_BLOCK], 0)

  kernel = functools.partial(_dkv_kernel, queries_per_item=qpi, heads=heads,
                             block_size=block_size, scale=scale)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(work.shape[0],),
      in_specs=[
          pl.BlockSpec(memory_space=pl.ANY),
          pl.BlockSpec((None, None, block_size, d), kv_index),
          pl.BlockSpec((None, None, block_size, dv_dim), kv_index),
          pl.BlockSpec(memory_space=pl.ANY),
          pl.BlockSpec((None, 2, rows), lambda i, *_: (i, 0, 0)),
          pl.BlockSpec((None, 1, rows), lambda i, *_: (i, 0, 0)),
      ],
      out_specs=[pl.BlockSpec((None, None, block_size, d), kv_index),
                 pl.BlockSpec((None, None, block_size, dv_dim), kv_index)],
      scratch_shapes=[
          pltpu.VMEM((qpi, heads, d), q.dtype),
          pltpu.VMEM((qpi, heads, dv_dim), q.dtype),
          pltpu.VMEM((block_size, d), jnp.float32),
          pltpu.VMEM((block_size, dv_dim), jnp.float32),
          pltpu.SemaphoreType.DMA((qpi,)),
          pltpu.SemaphoreType.DMA((qpi,)),
      ],
  )
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=(jax.ShapeDtypeStruct(k_t.shape, k_t.dtype),
                 jax.ShapeDtypeStruct(v_t.shape, v_t.dtype)),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=interpret,
      name="msa_sparse_attention_bwd_dkv",
  )(work.reshape(-1), schedule.q_rows, q.reshape(b * t * g, heads, d), k_t, v_t,
    d_out.reshape(b * t * g, heads, dv_dim), stats, last_key)


# ----------------------------------------------------------------------------- entry point


def sparse_attention_bwd(q, k, v, block_indices, q_positions, kv_lengths, out, lse, d_out,
                         d_lse=None, *, block_size, scale, interpret=False,
                         queries_per_item=None):
  """Gradients of ``reference.sparse_attention``'s output with respect to q, k, v (arguments
  and returns: ``ops/sparse_attention/backward.py``).

  TPU-only arguments:
    interpret: False, True, or ``pltpu.InterpretParams`` (the Mosaic-TPU simulator).
    queries_per_item: query positions per dK/dV tile (rows = this x Hq/G); default
      ``TILE_ROWS // (Hq/G)`` (``INTERPRET_TILE_ROWS`` in interpret mode).

  Raises:
    ValueError: on inconsistent shapes, or (compiling for a TPU) tiles Mosaic cannot lay out.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be rank 4 [B, T|S, heads, dim]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  b, t, hq, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  if g == 0 or hq % g or k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k [B, S, G, D] and v [B, S, G, Dv] must match q [B, T, Hq, D] with G "
                     f"dividing Hq; got q {q.shape}, k {k.shape}, v {v.shape}")
  if block_indices.ndim != 4 or block_indices.shape[:3] != (b, t, g):
    raise ValueError(f"block_indices must be [B, T, G, topk] = [{b}, {t}, {g}, topk]; got "
                     f"{block_indices.shape}")
  heads = hq // g
  tile = _sublane_tile(q.dtype)
  if queries_per_item is None:
    rows = INTERPRET_TILE_ROWS if interpret else TILE_ROWS
    queries_per_item = max(1, rows // heads)
    if not interpret and heads % tile:
      queries_per_item = 1
  if queries_per_item < 1:
    raise ValueError(f"queries_per_item must be >= 1; got {queries_per_item}")
  if not interpret:
    if block_size % tile:
      raise ValueError(f"block_size must be a multiple of {tile} for {q.dtype} on TPU "
                       f"(sublane tiling of the [block_size, D] K/V tiles); got {block_size}")
    if queries_per_item > 1 and heads % tile:
      raise ValueError(f"queries_per_item > 1 needs Hq/G a multiple of {tile} for {q.dtype} "
                       f"on TPU (the [queries, Hq/G, D] tile is viewed as [rows, D]); got "
                       f"Hq/G = {heads}, queries_per_item = {queries_per_item}")

  nb = reference.cdiv(s_len, block_size)
  pad = nb * block_size - s_len
  # Head-major K/V: one (batch, group, block) is a contiguous [Bk, D] tile.
  k_t = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  v_t = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  x = backward.prepare(q, block_indices, q_positions, kv_lengths, out, lse, d_out, d_lse, nb)
  # Key j is visible to a query iff j <= min(position, kv_len - 1) (docs/msa.md §2).
  last_key = jnp.minimum(x.q_positions, x.kv_lengths[:, None] - 1)

  stats = jnp.stack([x.lse.reshape(b, t, g, heads), x.delta.reshape(b, t, g, heads)], axis=-2)
  dq = _dq(q, k_t, v_t, x.d_out, stats, x.block_indices, x.valid, last_key,
           block_size=block_size, scale=scale, interpret=interpret)
  dk_t, dv_t = _dkv(q, k_t, v_t, x.d_out, x.lse, x.delta, x.block_indices, x.valid,
                    x.q_positions, x.kv_lengths, block_size=block_size, scale=scale,
                    queries_per_item=queries_per_item, interpret=interpret)
  dk = dk_t.transpose(0, 2, 1, 3)[:, :s_len]
  dv = dv_t.transpose(0, 2, 1, 3)[:, :s_len]
  return dq, dk, dv
