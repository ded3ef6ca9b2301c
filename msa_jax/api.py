"""Public API of msa_jax on contiguous caches: defaults and dispatch on ``implementation=``.

Every function validates its arguments first (``checks.py``: shapes, dtypes and static
arguments before anything is traced, ``ValueError`` naming the argument; block ids
range-checked when concrete, out-of-range ids ignored like -1 under ``jit``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp

from msa_jax import checks
from msa_jax import reference
from msa_jax import schedule as sched

IMPLEMENTATIONS = checks.IMPLEMENTATIONS

# Query chunk for index scoring: bounds the [B, G, chunk, S/Bk] block-score buffer.
INDEX_QUERY_CHUNK = 2048


# ----------------------------------------------------------------------------- index_topk


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
  from msa_jax.ops.index_topk import gpu_mosaic as kernel
  from msa_jax import tuning
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
    from msa_jax.ops.index_topk import gpu_triton as kernel
    from msa_jax import tuning
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
    from msa_jax.ops.index_topk import tpu as kernel
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
  checks.check_index_qk(q_idx, k_idx)
  block_size, topk = checks.check_static(block_size, topk)
  score_dtype = checks.check_score_dtype(score_dtype)
  impl = checks.resolve_implementation(implementation, interpret)
  b, t = q_idx.shape[:2]
  q_positions, kv_lengths = checks.resolve_positions(q_positions, kv_lengths, b, t, k_idx.shape[1])
  if checks.is_empty(b, t):
    return jnp.full((b, t, q_idx.shape[2], topk), -1, jnp.int32)
  return _index_topk(q_idx, k_idx, q_positions, kv_lengths, block_size=block_size, topk=topk,
                     impl=impl, interpret=interpret, score_dtype=score_dtype)


# ----------------------------------------------------------------------------- sparse attention


# Rows of one work item's tile (query positions x heads of the group): 8 x 16 at M3 shapes.
# The TPU kernel's; the GPU kernel takes its tile from the per-card table (msa_jax.tuning).
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
  from msa_jax.ops.sparse_attention import gpu_triton as sparse_attention
  from msa_jax import tuning
  if tuning.config("sparse")["kernel"] == "mosaic":  # Hopper TMA + wgmma, where it applies
    from msa_jax.ops.sparse_attention import gpu_mosaic as sparse_attention_mgpu
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
    if t <= checks.MAX_DECODE_QUERIES:  # decode: query-outer split-K, the paged kernel's
      from msa_jax.ops.sparse_attention import gpu_triton_paged as paged_sparse_decode
      # The contiguous cache seen as pages of one block each: block j of row i is page
      # i * nb + j (a reshape, no copy; no page table).
      as_pages = lambda x: x.reshape(b * nb, block_size, *x.shape[2:])
      return paged_sparse_decode.paged_sparse_decode(
          q, as_pages(k), as_pages(v), None, block_indices, q_positions, kv_lengths,
          block_size=block_size, scale=scale, interpret=interpret)
    from msa_jax.ops.sparse_attention import gpu_mosaic as sparse_attention_mgpu
    from msa_jax import tuning
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
      # query), at some speed (on the H200 one piece is fastest, so its table has None).
      piece = tuning.config("sparse").get("query_chunk") or t
      outs = [kv_outer(lo, min(lo + piece, t), live) for lo in range(0, t, piece)]
      return (outs[0] if len(outs) == 1 else
              tuple(jnp.concatenate(parts, axis=1) for parts in zip(*outs)))

    union_max = tuning.config("sparse").get("union_max") or 0
    from msa_jax.ops.sparse_attention import gpu_mosaic_union as union_kernel
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
    from msa_jax.ops.sparse_attention import tpu as kernel
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
    from msa_jax.ops.sparse_attention import gpu_triton_bwd as bwd
  else:
    from msa_jax.ops.sparse_attention import tpu_bwd as bwd
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
  checks.check_qkv(q, k, v)
  block_size, _ = checks.check_static(block_size)
  b, t, hq, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  checks.check_block_indices(block_indices, b, t, g, reference.cdiv(s_len, block_size))
  scale = checks.resolve_scale(scale, d)
  impl = checks.resolve_implementation(implementation, interpret)
  q_positions, kv_lengths = checks.resolve_positions(q_positions, kv_lengths, b, t, s_len)
  if checks.is_empty(b, t):
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
  checks.check_qkv(q, k, v)
  b, t, _, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  checks.check_index_qk(q_idx, k_idx, b, t, s_len, g)
  block_size, topk = checks.check_static(block_size, topk)
  score_dtype = checks.check_score_dtype(score_dtype)
  scale = checks.resolve_scale(scale, d)
  impl = checks.resolve_implementation(implementation, interpret)
  q_positions, kv_lengths = checks.resolve_positions(q_positions, kv_lengths, b, t, s_len)
  if checks.is_empty(b, t):
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
  checks.check_qkv(q, k, k)
  b, t, _, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  checks.check_index_qk(q_idx, k_idx, b, t, s_len, g)
  block_size, _ = checks.check_static(block_size)
  checks.check_block_indices(block_indices, b, t, g, reference.cdiv(s_len, block_size))
  scale = checks.resolve_scale(scale, d)
  impl = checks.resolve_implementation(implementation, interpret)
  q_positions, kv_lengths = checks.resolve_positions(q_positions, kv_lengths, b, t, s_len)
  if checks.is_empty(b, t):  # no query: no KL term (0, with zero gradients)
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
