"""Public API of msa_jax: argument checking, defaults, dispatch on ``implementation=``.

Every function validates shapes, dtypes and static arguments before anything is traced, and
raises ``ValueError`` naming the argument and what was expected. Block ids are range-checked
when they are concrete (outside ``jit``); under ``jit`` out-of-range ids are ignored like -1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from msa_jax import reference
from msa_jax import schedule as sched

IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu")

# Query chunk for index scoring: bounds the [B, G, chunk, S/Bk] block-score buffer.
INDEX_QUERY_CHUNK = 2048


# ----------------------------------------------------------------------------- validation


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def _check_rank(name: str, x, rank: int, layout: str):
  if x is None or not hasattr(x, "shape") or len(_shape(x)) != rank:
    got = None if x is None else _shape(x)
    raise ValueError(f"{name} must be a rank-{rank} array {layout}; got shape {got}")


def _check_float(name: str, x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array (bfloat16/float16/float32); "
                     f"got dtype {x.dtype}")


def _check_int(name: str, x, layout: str):
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array {layout}; got dtype {x.dtype}")


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
  """``value`` as a Python int (NumPy integers too); ``ValueError`` if not an int >= minimum."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
      or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
  return int(value)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_qkv(q, k, v):
  _check_rank("q", q, 4, "[batch, q_len, q_heads, head_dim]")
  _check_rank("k", k, 4, "[batch, kv_len, kv_heads, head_dim]")
  _check_rank("v", v, 4, "[batch, kv_len, kv_heads, v_head_dim]")
  for name, x in (("q", q), ("k", k), ("v", v)):
    _check_float(name, x)
  b, t, hq, d = q.shape
  if k.shape[0] != b or v.shape[0] != b:
    raise ValueError(f"batch mismatch: q has batch {b}, k {k.shape[0]}, v {v.shape[0]}")
  if k.shape[3] != d:
    raise ValueError(f"k must have head_dim {d} (as q): expected [{b}, S, G, {d}], "
                     f"got {k.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must match k in [batch, kv_len, kv_heads]: expected "
                     f"{list(k.shape[:3])} + [Dv], got {list(v.shape)}")
  if k.shape[1] < 1:
    raise ValueError(f"k and v must hold at least one key (kv_len >= 1); got k {k.shape}")
  g = k.shape[2]
  if g < 1 or hq % g:
    raise ValueError(f"q_heads ({hq}) must be a multiple of kv_heads = groups G ({g}); "
                     f"q {q.shape}, k {k.shape}")
  if q.dtype != k.dtype or k.dtype != v.dtype:
    raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _check_index_qk(q_idx, k_idx, batch=None, q_len=None, kv_len=None, groups=None):
  _check_rank("q_idx", q_idx, 4, "[batch, q_len, groups, index_dim]")
  _check_rank("k_idx", k_idx, 3, "[batch, kv_len, index_dim]")
  _check_float("q_idx", q_idx)
  _check_float("k_idx", k_idx)
  b, t, g, di = q_idx.shape
  if k_idx.shape[0] != b:
    raise ValueError(f"batch mismatch: q_idx has batch {b}, k_idx {k_idx.shape[0]}")
  if k_idx.shape[2] != di:
    raise ValueError(f"k_idx must have index_dim {di} (as q_idx): expected [{b}, S, {di}], "
                     f"got {k_idx.shape}")
  if k_idx.shape[1] < 1:
    raise ValueError(f"k_idx must hold at least one key (kv_len >= 1); got {k_idx.shape}")
  if batch is not None and b != batch:
    raise ValueError(f"batch mismatch: q has batch {batch}, q_idx {b}")
  if q_len is not None and t != q_len:
    raise ValueError(f"q_idx must have q_len {q_len} (as q): expected [{batch}, {q_len}, "
                     f"{groups}, Di], got {q_idx.shape}")
  if kv_len is not None and k_idx.shape[1] != kv_len:
    raise ValueError(f"k_idx must have kv_len {kv_len} (as k): expected [{batch}, {kv_len}, "
                     f"Di], got {k_idx.shape}")
  if groups is not None and g != groups:
    raise ValueError(f"q_idx must have one index head per KV group: expected {groups} groups "
                     f"(k has {groups} kv_heads), got q_idx shape {q_idx.shape}")


def _resolve_positions(q_positions, kv_lengths, batch: int, q_len: int, kv_len: int):
  if kv_lengths is None:
    kv_lengths = jnp.full((batch,), kv_len, jnp.int32)
  else:
    _check_rank("kv_lengths", kv_lengths, 1, f"[batch={batch}]")
    _check_int("kv_lengths", kv_lengths, f"[batch={batch}]")
    if _shape(kv_lengths) != (batch,):
      raise ValueError(f"kv_lengths must have shape [{batch}]; got {_shape(kv_lengths)}")
    if _is_concrete(kv_lengths):
      arr = np.asarray(kv_lengths)
      if arr.min(initial=0) < 0 or arr.max(initial=0) > kv_len:
        raise ValueError(f"kv_lengths must lie in [0, {kv_len}] (the key length); got {arr}")
    kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
  if q_positions is None:
    q_positions = reference.default_q_positions(q_len, kv_lengths)
  else:
    _check_rank("q_positions", q_positions, 2, f"[batch={batch}, q_len={q_len}]")
    _check_int("q_positions", q_positions, f"[batch={batch}, q_len={q_len}]")
    if _shape(q_positions) != (batch, q_len):
      raise ValueError(f"q_positions must have shape [{batch}, {q_len}]; "
                       f"got {_shape(q_positions)}")
    q_positions = jnp.asarray(q_positions, jnp.int32)
  return q_positions, kv_lengths


def _check_block_indices(block_indices, batch, q_len, groups, num_blocks):
  layout = f"[batch={batch}, q_len={q_len}, groups={groups}, topk]"
  _check_rank("block_indices", block_indices, 4, layout)
  _check_int("block_indices", block_indices, layout)
  if _shape(block_indices)[:3] != (batch, q_len, groups):
    raise ValueError(f"block_indices must have shape {layout}; got {_shape(block_indices)}")
  if block_indices.shape[3] < 1:
    raise ValueError(f"block_indices must hold at least one slot per (query, group); "
                     f"got shape {_shape(block_indices)}")
  if _is_concrete(block_indices):
    arr = np.asarray(block_indices)
    if arr.size and (arr.max() >= num_blocks or arr.min() < -1):
      raise ValueError(f"block_indices must be -1 or a block id in [0, {num_blocks}) "
                       f"({num_blocks} blocks of the keys); got values in "
                       f"[{arr.min()}, {arr.max()}]")


def _resolve_implementation(implementation, interpret) -> str:
  if implementation is None:
    backend = jax.default_backend()
    if backend == "tpu":
      return "pallas_tpu"
    if backend == "gpu" or interpret:
      return "pallas_gpu"
    return "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None; "
                     f"got {implementation!r}")
  return implementation


def _check_static(block_size, topk=None):
  """(block_size, topk) checked and as Python ints (a NumPy integer is accepted)."""
  block_size = _check_positive_int("block_size", block_size)
  if topk is not None:
    topk = _check_positive_int("topk", topk)
  return block_size, topk


def _empty(*sizes) -> bool:
  """True when a batch or query length is 0: the result is an empty array, computed by no
  kernel (grids and chunkings of zero length are not defined)."""
  return any(int(n) == 0 for n in sizes)


def _scale(scale, head_dim):
  if scale is None:
    return 1.0 / math.sqrt(head_dim)
  scale = float(scale)
  if not math.isfinite(scale) or scale <= 0:
    raise ValueError(f"scale must be a finite positive number; got {scale}")
  return scale


# ----------------------------------------------------------------------------- index_topk


SCORE_DTYPES = (None, "float8_e4m3fn")


def _check_score_dtype(score_dtype):
  try:
    name = None if score_dtype is None else jnp.dtype(score_dtype).name
  except TypeError:
    name = score_dtype
  if name not in SCORE_DTYPES:
    raise ValueError(f"score_dtype must be one of {SCORE_DTYPES}; got {score_dtype!r}")
  return name


def fp8_rounded(x):
  """Index queries as FP8 scoring sees them (``reference.fp8_round``), in x's dtype: an E4M3
  value times a power of two is exact in float32 and bfloat16."""
  return reference.fp8_round(x).astype(x.dtype)


def _mosaic_index_topk(q_idx, k_idx, q_positions, kv_lengths, *, block_size, topk, interpret,
                       score_dtype, decode):
  """The Mosaic GPU index kernel (Hopper), or None where it does not apply to these inputs.

  Decode (few rows) splits the keys into ranges over enough CTAs to reach the table's
  ``min_programs``. FP8: q's per-token scale never changes a row's order (dropped); each
  block's scale multiplies its block max."""
  from msa_jax.kernels.gpu import index_topk_mgpu as kernel
  from msa_jax.kernels.gpu import tuning
  fp8 = score_dtype is not None
  if not (kernel.supports_fp8(q_idx, block_size, topk) if fp8 else
          kernel.supports(q_idx, k_idx, block_size, topk)):
    return None
  splits = 1
  if decode:
    b, t, g, _ = q_idx.shape
    ctas = b * reference.cdiv(t * g, kernel.CTA_ROWS)
    splits = reference.cdiv(tuning.config("index_decode").get("min_programs") or 1, ctas)
    if interpret:  # enough ranges to exercise the merge, few enough to simulate
      splits = min(splits, 4)
  scale = None
  if fp8:
    q_idx, _ = reference.fp8_per_token(q_idx)
    k_idx, scale = reference.fp8_per_block(k_idx, block_size)
  return kernel.fused_topk(q_idx, k_idx, q_positions, kv_lengths, block_size=block_size,
                           topk=topk, k_block_scale=scale, splits=splits, interpret=interpret)


def _index_topk(q_idx, k_idx, q_positions, kv_lengths, *, block_size, topk, impl, interpret,
                score_dtype=None):
  selection = "scores"
  if impl == "pallas_gpu":
    from msa_jax.kernels.gpu import index_topk as kernel
    from msa_jax.kernels.gpu import tuning
    key = kernel.config_key(q_idx.shape[1])
    selection = tuning.config(key)["selection"]
    if selection == "mosaic":  # Hopper wgmma + TMA; other inputs take a Triton kernel
      ids = _mosaic_index_topk(q_idx, k_idx, q_positions, kv_lengths, block_size=block_size,
                               topk=topk, interpret=interpret, score_dtype=score_dtype,
                               decode=key == "index_decode")
      if ids is not None:
        return ids
      selection = "fused" if key == "index" else "tile"
  elif impl == "pallas_tpu":
    from msa_jax.kernels.tpu import index_topk as kernel
  if score_dtype is not None:
    # The selection from the FP8-rounded values (exact in the inputs' dtype).
    q_idx = fp8_rounded(q_idx)
    k_idx = reference.fp8_round_blocks(k_idx, block_size).astype(k_idx.dtype)
  if impl == "xla":
    return reference.index_topk(q_idx, k_idx, q_positions, kv_lengths, block_size=block_size,
                                topk=topk)
  if selection == "fused":  # nothing per query but the ids is kept: no chunking needed
    return kernel.fused_topk(q_idx, k_idx, q_positions, kv_lengths, block_size=block_size,
                             topk=topk, interpret=interpret)

  def chunk(pos, qi):
    if selection == "tile":
      # Each key tile's top blocks come out of the scoring kernel; block scores never do.
      values, ids = kernel.tile_candidates(qi, k_idx, pos, kv_lengths, block_size=block_size,
                                           topk=topk, interpret=interpret)
      if key == "index_decode":  # few rows: one small merge kernel
        return kernel.merge_candidates(values, ids, topk, interpret=interpret)
      return reference.top_candidates(values, ids, topk)
    scores = kernel.block_scores(qi, k_idx, pos, kv_lengths, block_size=block_size,
                                 interpret=interpret)
    return reference.select_blocks(scores, reference.own_block(pos, kv_lengths, block_size),
                                   topk)

  return reference.map_query_chunks(chunk, INDEX_QUERY_CHUNK, q_positions, q_idx)


def index_topk(q_idx, k_idx, *, block_size=128, topk=16, q_positions=None, kv_lengths=None,
               implementation=None, interpret=False, score_dtype=None):
  """Select the top-k KV blocks per (query, group) from the index branch (docs/msa.md §3).

  Args:
    q_idx: [B, T, G, Di] index queries, one head per KV group.
    k_idx: [B, S, Di] index keys (one shared head).
    block_size: KV block size Bk in tokens.
    topk: blocks per (query, group), the query's own block included.
    q_positions: int [B, T] absolute query positions (default: bottom-right aligned).
    kv_lengths: int [B] valid key length per sequence (default: S).
    implementation: None (best for the backend), "xla", "pallas_gpu" or "pallas_tpu".
    interpret: run a Pallas implementation in interpret mode (any backend).
    score_dtype: None (scores from q_idx/k_idx as given) or "float8_e4m3fn": q_idx rounded
      to E4M3 with one power-of-two scale per token, k_idx with one per KV block
      (``reference.fp8_round`` / ``fp8_round_blocks``), and scored from those values; on
      Hopper with the Mosaic index kernel the GEMM runs in FP8. Not the default: on long
      contexts its selection keeps 92-98% of the bf16 selection's blocks
      (``benchmarks/NOTES.md``).

  Returns:
    int32 [B, T, G, topk]: selected block ids, valid ids first, -1 padding. Order inside the
    valid prefix is unspecified.
  """
  _check_index_qk(q_idx, k_idx)
  block_size, topk = _check_static(block_size, topk)
  score_dtype = _check_score_dtype(score_dtype)
  impl = _resolve_implementation(implementation, interpret)
  b, t = q_idx.shape[:2]
  q_positions, kv_lengths = _resolve_positions(q_positions, kv_lengths, b, t, k_idx.shape[1])
  if _empty(b, t):
    return jnp.full((b, t, q_idx.shape[2], topk), -1, jnp.int32)
  return _index_topk(q_idx, k_idx, q_positions, kv_lengths, block_size=block_size, topk=topk,
                     impl=impl, interpret=interpret, score_dtype=score_dtype)


# ----------------------------------------------------------------------------- sparse attention


# Rows of one work item's tile (query positions x heads of the group): 8 x 16 at M3 shapes.
# The TPU kernel's; the GPU kernel takes its tile from the per-card table (tuning.py).
TILE_ROWS = 128
# Interpret mode runs the same kernels with smaller tiles: CPU cost grows with the unrolled
# per-row gathers, and small tiles split lists into more items (more schedule edge cases).
INTERPRET_TILE_ROWS = 32


def _queries_per_item(heads_per_group: int, interpret) -> int:
  rows = INTERPRET_TILE_ROWS if interpret else TILE_ROWS
  return max(1, rows // heads_per_group)


def gpu_sparse_kernel(q, k, v, block_size: int):
  """The GPU KV-outer kernel module for these inputs: the Mosaic GPU one where the card's
  tuning table picks it and it supports the shapes, else the Triton one."""
  from msa_jax.kernels.gpu import sparse_attention
  from msa_jax.kernels.gpu import tuning
  if tuning.config("sparse")["kernel"] == "mosaic":  # Hopper TMA + wgmma, where it applies
    from msa_jax.kernels.gpu import sparse_attention_mgpu
    if sparse_attention_mgpu.supports(q, k, v, block_size):
      return sparse_attention_mgpu
  return sparse_attention


def _pallas_forward(q, k, v, block_indices, q_positions, kv_lengths, *, block_size, scale,
                    impl, interpret):
  """Sparse attention through the Pallas kernels.

  KV-outer (schedule -> kernel -> combine) in general; on GPU, few queries per sequence
  (decode, speculative verification) go query-outer with split-K instead, since then there is
  nothing to share across queries.
  """
  b, t, hq, _ = q.shape
  s_len, g = k.shape[1], k.shape[2]
  nb = reference.cdiv(s_len, block_size)
  valid = reference.valid_block_mask(block_indices, nb)
  pad = nb * block_size - s_len
  k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  if impl == "pallas_gpu":
    from msa_jax import paged_api
    if t <= paged_api.MAX_DECODE_QUERIES:  # decode: query-outer split-K, the paged kernel's
      from msa_jax.kernels.gpu import paged_sparse_decode
      # The contiguous cache seen as pages of one block each: block j of row i is page
      # i * nb + j (a reshape, no copy; no page table).
      as_pages = lambda x: x.reshape(b * nb, block_size, *x.shape[2:])
      return paged_sparse_decode.paged_sparse_decode(
          q, as_pages(k), as_pages(v), None, block_indices, q_positions, kv_lengths,
          block_size=block_size, scale=scale, interpret=interpret)
    from msa_jax.kernels.gpu import sparse_attention_mgpu
    from msa_jax.kernels.gpu import tuning
    kernel = gpu_sparse_kernel(q, k, v, block_size)
    per_tile, per_item = kernel.work_item_size(
        hq // g, tile_rows=INTERPRET_TILE_ROWS if interpret else None)
    guarded = kernel is sparse_attention_mgpu  # its P @ V takes V as loaded: clean it first
    if guarded:
      v, bad_prefix = kernel.guard_values(v, kv_lengths)

    def kv_outer(lo, hi, live):  # queries [lo, hi): schedule -> kernel -> combine
      ids = block_indices[:, lo:hi]
      schedule = sched.build_schedule(ids, live[:, lo:hi], q_positions[:, lo:hi], nb,
                                      per_item)
      partial_out, partial_lse = kernel.sparse_attention_partials(
          q[:, lo:hi], k, v, schedule, kv_lengths, block_size=block_size, scale=scale,
          topk=ids.shape[3], queries_per_tile=per_tile, tiles_per_item=per_item // per_tile,
          interpret=interpret)
      return sched.combine(partial_out, partial_lse, live[:, lo:hi], q.dtype)

    def kv_outer_all(live=valid):
      # Long query ranges in pieces (``query_chunk``): smaller partial buffers (k rows per
      # query), at some speed (on the H200 one piece is fastest: 20.7 vs 22.0 ms at 16K
      # pieces of a 64K chunk, so its table has None).
      piece = tuning.config("sparse").get("query_chunk") or t
      outs = [kv_outer(lo, min(lo + piece, t), live) for lo in range(0, t, piece)]
      return (outs[0] if len(outs) == 1 else
              tuple(jnp.concatenate(parts, axis=1) for parts in zip(*outs)))

    union_max = tuning.config("sparse").get("union_max") or 0
    from msa_jax.kernels.gpu import sparse_attention_union_mgpu as union_kernel
    if guarded and union_max and union_kernel.supports(q, k, v, block_size):
      # Query-outer over tiles of neighbouring queries when they share their blocks (small
      # tile unions, as with a trained indexer's selections): each tile's blocks loaded once,
      # no partials, no combine. KV-outer where they do not.
      unions = union_kernel.tile_unions(block_indices, valid, hq // g)
      union = lambda u: union_kernel.sparse_attention(
          q, k, v, block_indices, valid, q_positions, kv_lengths, block_size=block_size,
          scale=scale, unions=u, interpret=interpret)
      if tuning.config("sparse").get("union_mix"):
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
  else:
    from msa_jax.kernels.tpu import sparse_attention as kernel
    qpi = _queries_per_item(hq // g, interpret)
    schedule = sched.build_schedule(block_indices, valid, q_positions, nb, qpi)
    partial_out, partial_lse = kernel.sparse_attention_partials(
        q, k, v, schedule, kv_lengths, block_size=block_size, scale=scale,
        topk=block_indices.shape[3], queries_per_item=qpi, interpret=interpret)
  return sched.combine(partial_out, partial_lse, valid, q.dtype)


def _union_per_tile(unions, union_max, union, kv_outer, valid, heads):
  """Each tile of queries on the union path if its union has at most ``union_max`` blocks,
  the others KV-outer (``union(unions)`` and ``kv_outer(live)`` run the two paths; tiles
  emptied of blocks cost the union kernel nothing, queries without live slots cost KV-outer
  no work items). When every tile goes one way, only that path runs."""
  from msa_jax.kernels.gpu import sparse_attention_union_mgpu as union_kernel
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


def _sparse_attention(q, k, v, block_indices, q_positions, kv_lengths, *, block_size, scale,
                      impl, interpret):
  if impl == "xla":
    return reference.sparse_attention(q, k, v, block_indices, q_positions, kv_lengths,
                                      block_size=block_size, scale=scale)
  return _pallas_sparse_attention(q, k, v, block_indices, q_positions, kv_lengths, block_size,
                                  scale, impl, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _pallas_sparse_attention(q, k, v, block_indices, q_positions, kv_lengths, block_size, scale,
                             impl, interpret):
  """Pallas forward -> (out, lse); the backward recomputes probabilities from them."""
  return _pallas_forward(q, k, v, block_indices, q_positions, kv_lengths,
                         block_size=block_size, scale=scale, impl=impl, interpret=interpret)


def _pallas_fwd(q, k, v, block_indices, q_positions, kv_lengths, block_size, scale, impl,
                interpret):
  out, lse = _pallas_sparse_attention(q, k, v, block_indices, q_positions, kv_lengths,
                                      block_size, scale, impl, interpret)
  return (out, lse), (q, k, v, block_indices, q_positions, kv_lengths, out, lse)


def _pallas_bwd(block_size, scale, impl, interpret, residuals, cotangents):
  q, k, v, block_indices, q_positions, kv_lengths, out, lse = residuals
  d_out, d_lse = cotangents
  if impl == "pallas_gpu":
    from msa_jax.kernels.gpu import sparse_attention_bwd as bwd
  else:
    from msa_jax.kernels.tpu import sparse_attention_bwd as bwd
  dq, dk, dv = bwd.sparse_attention_bwd(q, k, v, block_indices, q_positions, kv_lengths, out,
                                        lse, d_out, d_lse, block_size=block_size, scale=scale,
                                        interpret=interpret)
  return dq, dk, dv, None, None, None


_pallas_sparse_attention.defvjp(_pallas_fwd, _pallas_bwd)


def sparse_attention(q, k, v, block_indices, *, block_size=128, scale=None, q_positions=None,
                     kv_lengths=None, return_lse=False, implementation=None, interpret=False):
  """Exact attention of each query over the visible keys of its selected blocks (docs/msa.md §4).

  Args:
    q: [B, T, Hq, D]; k: [B, S, G, D]; v: [B, S, G, Dv]; Hq a multiple of G. Query head h
      belongs to group h // (Hq/G).
    block_indices: int [B, T, G, topk] selected block ids per (query, group); -1 = none.
      Repeated ids count once.
    block_size: KV block size in tokens.
    scale: logit scale (default 1/sqrt(D)).
    q_positions, kv_lengths: as in ``index_topk``.
    return_lse: also return the float32 log-sum-exp [B, T, Hq] (natural log).
    implementation, interpret: as in ``index_topk``.

  Returns:
    out [B, T, Hq, Dv] in q's dtype (and lse). Queries without a visible key (padding) get
    out = 0 and lse = -inf.
  """
  _check_qkv(q, k, v)
  block_size, _ = _check_static(block_size)
  b, t, hq, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  _check_block_indices(block_indices, b, t, g, reference.cdiv(s_len, block_size))
  scale = _scale(scale, d)
  impl = _resolve_implementation(implementation, interpret)
  q_positions, kv_lengths = _resolve_positions(q_positions, kv_lengths, b, t, s_len)
  if _empty(b, t):
    out = jnp.zeros((b, t, hq, v.shape[3]), q.dtype)
    lse = jnp.full((b, t, hq), -jnp.inf, jnp.float32)
    return (out, lse) if return_lse else out
  out, lse = _sparse_attention(q, k, v, jnp.asarray(block_indices, jnp.int32), q_positions,
                               kv_lengths, block_size=block_size, scale=scale, impl=impl,
                               interpret=interpret)
  return (out, lse) if return_lse else out


def msa_attention(q, k, v, q_idx, k_idx, *, block_size=128, topk=16, scale=None,
                  q_positions=None, kv_lengths=None, return_indices=False,
                  implementation=None, interpret=False, score_dtype=None):
  """MSA: index branch selects blocks (``index_topk``), main branch attends to them.

  Shapes as in ``index_topk`` and ``sparse_attention``; ``q_idx`` has one head per KV group.
  ``score_dtype``: the index scores' precision, as in ``index_topk``.
  Returns out [B, T, Hq, Dv], and the int32 [B, T, G, topk] selection when
  ``return_indices``. Gradients flow to q, k, v (selection is not differentiable; train the
  index branch with ``indexer_kl_loss``).
  """
  _check_qkv(q, k, v)
  b, t, _, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  _check_index_qk(q_idx, k_idx, b, t, s_len, g)
  block_size, topk = _check_static(block_size, topk)
  score_dtype = _check_score_dtype(score_dtype)
  scale = _scale(scale, d)
  impl = _resolve_implementation(implementation, interpret)
  q_positions, kv_lengths = _resolve_positions(q_positions, kv_lengths, b, t, s_len)
  if _empty(b, t):
    out = jnp.zeros((b, t, q.shape[2], v.shape[3]), q.dtype)
    ids = jnp.full((b, t, g, topk), -1, jnp.int32)
    return (out, ids) if return_indices else out
  ids = _index_topk(jax.lax.stop_gradient(q_idx), jax.lax.stop_gradient(k_idx), q_positions,
                    kv_lengths, block_size=block_size, topk=topk, impl=impl,
                    interpret=interpret, score_dtype=score_dtype)
  out, _ = _sparse_attention(q, k, v, ids, q_positions, kv_lengths, block_size=block_size,
                             scale=scale, impl=impl, interpret=interpret)
  return (out, ids) if return_indices else out


def indexer_kl_loss(q, k, q_idx, k_idx, block_indices, *, block_size=128, scale=None,
                    q_positions=None, kv_lengths=None, implementation=None, interpret=False):
  """KL alignment loss of the index branch (docs/msa.md §5), a float32 scalar.

  ``1/(N*G) * sum_{t,g} KL(P_teacher || P_idx)`` over the visible tokens of the selected blocks,
  N = number of non-padding queries. The teacher is the mean over the group's heads of each
  head's softmax of ``scale * q.k`` renormalised on that support, with q and k detached; the
  student is the softmax of ``q_idx.k_idx / sqrt(Di)``. Gradients reach q_idx and k_idx only.

  The value comes from the gather-based reference in query chunks. With a Pallas
  ``implementation`` the gradient runs through the sparse attention kernels (``_kl_grads``):
  autodiff of the reference would scatter-add every gathered key into k_idx, which serialises
  on the GPU (0.88 s of a 1.1 s training step at 8K x 8), and keep every chunk's gathered keys
  for the backward (over 100 GB at 8K x 8 with Di = 128).
  """
  _check_qkv(q, k, k)
  b, t, _, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  _check_index_qk(q_idx, k_idx, b, t, s_len, g)
  block_size, _ = _check_static(block_size)
  _check_block_indices(block_indices, b, t, g, reference.cdiv(s_len, block_size))
  scale = _scale(scale, d)
  impl = _resolve_implementation(implementation, interpret)
  q_positions, kv_lengths = _resolve_positions(q_positions, kv_lengths, b, t, s_len)
  if _empty(b, t):  # no query: no KL term (0, with zero gradients)
    return 0.0 * (jnp.sum(q_idx, dtype=jnp.float32) + jnp.sum(k_idx, dtype=jnp.float32))
  ids = jnp.asarray(block_indices, jnp.int32)
  if impl == "xla":
    return reference.indexer_kl_loss(q, k, q_idx, k_idx, ids, q_positions, kv_lengths,
                                     block_size=block_size, scale=scale)
  return _pallas_kl_loss(q, k, q_idx, k_idx, ids, q_positions, kv_lengths, block_size, scale,
                         impl, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _pallas_kl_loss(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths, block_size,
                    scale, impl, interpret):
  return reference.indexer_kl_loss(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths,
                                   block_size=block_size, scale=scale)


def _pallas_kl_fwd(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths, block_size,
                   scale, impl, interpret):
  loss = _pallas_kl_loss(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths,
                         block_size, scale, impl, interpret)
  return loss, (q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths)


def _pallas_kl_bwd(block_size, scale, impl, interpret, residuals, g_loss):
  q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths = residuals
  dq_idx, dk_idx = _kl_grads(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths,
                             block_size=block_size, scale=scale, impl=impl, interpret=interpret)
  return (jnp.zeros_like(q), jnp.zeros_like(k), (g_loss * dq_idx).astype(q_idx.dtype),
          (g_loss * dk_idx).astype(k_idx.dtype), None, None, None)


_pallas_kl_loss.defvjp(_pallas_kl_fwd, _pallas_kl_bwd)


def _kl_grads(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths, *, block_size,
              scale, impl, interpret):
  """(d/d q_idx, d/d k_idx) of the indexer KL (float32) from two sparse attentions.

  With c = 1/(N*G*sqrt(Di)) the gradients are (docs/msa.md §5), over the support:
    ``dq_idx[t,g] = c * sum_j (P_idx - P_teacher)[t,g,j] * k_idx[j]``
    ``dk_idx[j] = c * sum_{t,g} (P_idx - P_teacher)[t,g,j] * q_idx[t,g]``.
  Attend with the index queries (one head per group, keys k_idx, scale 1/sqrt(Di)) and with
  the main queries (q, k, ``scale``: each head's softmax on the same support), both with
  values k_idx: the outputs are sum_j P k_idx[j], so dq_idx is c times the index output minus
  the group mean of the main outputs. dk_idx is the dV of the index attention for the output
  gradient ``c * q_idx`` minus that of the main attention for ``c * q_idx / (Hq/G)`` given to
  every head of the group (which averages the heads): the KV-outer backward kernel over the
  selection's inverse map, each block's dV accumulated in one place. Kernels run in q's dtype
  (float32 accumulation inside).
  """
  b, t, hq, _ = q.shape
  g, di = k.shape[2], q_idx.shape[-1]
  cast = lambda x: lax.stop_gradient(x).astype(q.dtype)
  q, k, q_idx = cast(q), cast(k), cast(q_idx)
  k_idx_g = jnp.broadcast_to(cast(k_idx)[:, :, None, :], (b, k_idx.shape[1], g, di))
  attend = lambda q, k, v, scale: _pallas_sparse_attention(
      q, k, v, block_indices, q_positions, kv_lengths, block_size, scale, impl, interpret)
  (out_idx, lse_idx), vjp_idx = jax.vjp(
      lambda v: attend(q_idx, k_idx_g, v, 1.0 / math.sqrt(di)), k_idx_g)
  (out_main, lse_main), vjp_main = jax.vjp(lambda v: attend(q, k, v, scale), k_idx_g)
  supported = (lse_idx > -jnp.inf)[..., None]  # [B, T, G, 1]: a non-empty support
  n = jnp.sum(jnp.any(supported[..., 0], axis=-1))  # queries counted by the loss
  c = 1.0 / (jnp.maximum(n, 1) * g * math.sqrt(di)).astype(jnp.float32)
  teacher = jnp.mean(out_main.astype(jnp.float32).reshape(b, t, g, hq // g, di), axis=3)
  dq_idx = jnp.where(supported, c * (out_idx.astype(jnp.float32) - teacher), 0.0)
  do_idx = jnp.where(supported, c * q_idx.astype(jnp.float32), 0.0)
  (dv_idx,) = vjp_idx((do_idx.astype(q.dtype), jnp.zeros_like(lse_idx)))
  do_main = jnp.repeat(do_idx / (hq // g), hq // g, axis=2).astype(q.dtype)
  (dv_main,) = vjp_main((do_main, jnp.zeros_like(lse_main)))
  dk_idx = jnp.sum(dv_idx.astype(jnp.float32) - dv_main.astype(jnp.float32), axis=2)
  return dq_idx, dk_idx


__all__: Sequence[str] = ("index_topk", "sparse_attention", "msa_attention", "indexer_kl_loss",
                          "IMPLEMENTATIONS")
