"""Pure ``jax.numpy`` MSA: the executable spec (``docs/msa.md`` §2-5).

This module is both the ``implementation="xla"`` path and the oracle every kernel is tested
against. Functions here take already-validated arguments (see ``api.py``); ``q_positions`` and
``kv_lengths`` are always explicit int32 arrays.

Layouts: ``q [B,T,Hq,D]``, ``k/v [B,S,G,D]``, ``q_idx [B,T,G,Di]``, ``k_idx [B,S,Di]``,
``q_positions [B,T]``, ``kv_lengths [B]``, ``block_indices [B,T,G,topk]`` (-1 = none).

Memory is bounded by processing queries in chunks of ``chunk_size`` positions: nothing of size
``[T, S]`` is ever built, only ``[chunk, S/Bk]`` block scores and ``[chunk, topk*Bk]`` gathers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_CHUNK = 512


# ----------------------------------------------------------------------------- positions & masks


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def default_q_positions(q_len: int, kv_lengths: jax.Array) -> jax.Array:
  """Bottom-right aligned positions: query t of a sequence of length L sits at L - T + t."""
  return (kv_lengths[:, None] - q_len + jnp.arange(q_len, dtype=jnp.int32)[None, :]).astype(
      jnp.int32)


def own_block(q_positions: jax.Array, kv_lengths: jax.Array, block_size: int) -> jax.Array:
  """The block holding each query's last visible key; -1 for padding queries. int32 [B,T]."""
  last_visible = jnp.minimum(q_positions, kv_lengths[:, None] - 1)
  return jnp.where(last_visible >= 0, last_visible // block_size, -1).astype(jnp.int32)


def key_visible(key_pos: jax.Array, q_pos: jax.Array, kv_len: jax.Array) -> jax.Array:
  """Key j is visible to a query at p iff j <= p and j < kv_len (docs/msa.md §2); broadcasts."""
  return (key_pos <= q_pos) & (key_pos < kv_len)


def valid_block_mask(block_indices: jax.Array, num_blocks: int) -> jax.Array:
  """Which slots of ``block_indices`` [..., topk] name a block: in range and not a repeat.

  A block listed twice counts once (the selection is a set), so later repeats are dropped.
  """
  ids = block_indices
  in_range = (ids >= 0) & (ids < num_blocks)
  k = ids.shape[-1]
  same = ids[..., :, None] == ids[..., None, :]
  earlier = jnp.tril(jnp.ones((k, k), dtype=bool), -1)
  repeated = jnp.any(same & earlier, axis=-1)
  return in_range & ~repeated


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def map_query_chunks(fn, chunk_size: int, q_positions: jax.Array, *per_query: jax.Array):
  """Apply ``fn(q_positions_chunk, *chunks)`` over chunks of the query axis (axis 1).

  Padded queries get position -1 (padding) and are sliced away afterwards. ``fn`` returns a
  pytree of arrays with the query axis at 1.
  """
  t = q_positions.shape[1]
  if t <= chunk_size:
    return fn(q_positions, *per_query)
  n = cdiv(t, chunk_size)
  tp = n * chunk_size

  def split(x, fill):
    x = _pad_axis(x, 1, tp, fill)
    x = x.reshape(x.shape[0], n, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  xs = (split(q_positions, -1),) + tuple(split(x, 0) for x in per_query)
  ys = lax.map(lambda args: fn(*args), xs)

  def merge(y):
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], tp, *y.shape[3:])[:, :t]

  return jax.tree.map(merge, ys)


# ----------------------------------------------------------------------------- index branch


def block_scores(q_idx, k_idx, q_positions, kv_lengths, *, block_size):
  """Block-max index scores ``M[b,t,g,j]`` (fp32), -inf where block j has no visible key.

  Causal/length masking is applied per token before the max-pool (docs/msa.md §3.3).
  """
  s_len = k_idx.shape[1]
  nb = cdiv(s_len, block_size)
  k_idx = _pad_axis(k_idx, 1, nb * block_size)
  key_pos = jnp.arange(nb * block_size, dtype=jnp.int32)
  s = jnp.einsum("btgd,bsd->btgs", q_idx, k_idx, preferred_element_type=jnp.float32)
  vis = key_visible(key_pos[None, None, :], q_positions[:, :, None], kv_lengths[:, None, None])
  s = jnp.where(vis[:, :, None, :], s, -jnp.inf)
  return s.reshape(*s.shape[:3], nb, block_size).max(axis=-1)


def select_blocks(scores: jax.Array, own: jax.Array, topk: int) -> jax.Array:
  """Exp-free top-k over block scores [B,T,G,nb] with the own block forced (docs/msa.md §3.4-5).

  The own block takes one slot (its score is raised to +inf, so it cannot appear twice);
  the other slots take the highest-scoring visible blocks, ties to the lower block id
  (``lax.top_k`` keeps the lower index first). Blocks scoring -inf are never chosen: the
  slot is -1 instead. Returns int32 [B,T,G,topk], valid entries first.
  """
  nb = scores.shape[-1]
  is_own = jnp.arange(nb, dtype=jnp.int32) == own[:, :, None, None]
  return top_candidates(jnp.where(is_own, jnp.inf, scores), None, topk)


def top_candidates(values: jax.Array, ids: jax.Array | None, topk: int) -> jax.Array:
  """The ``topk`` highest candidates [..., n] -> block ids [..., topk], -1 for -inf/missing.

  ``ids`` gives each candidate's block id (None: the position is the id). Ties go to the
  earlier candidate, so candidates must be laid out with lower block ids first among equals.
  """
  values, at = exact_top_k(values, min(topk, values.shape[-1]))
  chosen = at if ids is None else jnp.take_along_axis(ids, at, axis=-1)
  chosen = jnp.where(values == -jnp.inf, -1, chosen).astype(jnp.int32)
  return _pad_axis(chosen, chosen.ndim - 1, topk, -1)


def exact_top_k(x: jax.Array, k: int, group: int = 128):
  """``lax.top_k`` over the last axis in two stages: the top k of each group of ``group``
  entries, then the top k of those candidates.

  Same values and ids as one ``lax.top_k`` (ties to the lower index: candidates are laid out
  group by group, each group's in top-k order), but sorts rows of ``group`` and
  ``(n/group)*k`` entries instead of ``n``: much cheaper when n is thousands of blocks.
  """
  n = x.shape[-1]
  if n <= 4 * group or k > group:
    return lax.top_k(x, k)
  num_groups = cdiv(n, group)
  x = _pad_axis(x, x.ndim - 1, num_groups * group, -jnp.inf)
  v1, i1 = lax.top_k(x.reshape(*x.shape[:-1], num_groups, group), k)
  i1 = i1 + (jnp.arange(num_groups, dtype=i1.dtype) * group)[:, None]
  v2, j = lax.top_k(v1.reshape(*v1.shape[:-2], num_groups * k), k)
  return v2, jnp.take_along_axis(i1.reshape(*i1.shape[:-2], num_groups * k), j, axis=-1)


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def _fp8_scale(amax):
  """Power-of-two scales (as the E8M0 scales of MX formats) for groups of largest magnitude
  ``amax``: amax / 448 rounded up, 1 for all-zero groups. Applying or removing a power of two
  is exact, and E4M3 rounding commutes with it (outside the subnormal range)."""
  return jnp.where(amax > 0, jnp.exp2(jnp.ceil(jnp.log2(amax / FP8_MAX))), 1.0)


def _finite_abs(x):
  return jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)


def fp8_per_token(x: jax.Array):
  """``x [..., D]`` -> ``(x8 float8_e4m3fn [..., D], scale float32 [...])``, x ~ x8 * scale,
  one scale per token (its largest finite magnitude). A positive factor per row never changes
  the order of a query's scores, so the kernels may drop the queries' scales."""
  xf = x.astype(jnp.float32)
  scale = _fp8_scale(jnp.max(_finite_abs(xf), axis=-1))
  return (xf / scale[..., None]).astype(jnp.float8_e4m3fn), scale


def fp8_per_block(k: jax.Array, block_size: int):
  """Keys ``[B, S, D]`` -> ``(k8 float8_e4m3fn [B, S, D], scale float32 [B, S/Bk])``: one
  scale per KV block (its largest finite magnitude, so a NaN key moves no other key's
  rounding). Garbage past a sequence's length can only sit in its last block, which is the
  own block of every query that sees any of it (always selected) and invisible to the
  others, so it never moves a selection either."""
  b, s_len, d = k.shape
  nb = cdiv(s_len, block_size)
  blocks = _pad_axis(k.astype(jnp.float32), 1, nb * block_size).reshape(b, nb, block_size, d)
  scale = _fp8_scale(jnp.max(_finite_abs(blocks), axis=(2, 3)))
  k8 = (blocks / scale[:, :, None, None]).astype(jnp.float8_e4m3fn)
  return k8.reshape(b, nb * block_size, d)[:, :s_len], scale


def fp8_round(x: jax.Array) -> jax.Array:
  """Index queries as FP8 scores see them (``fp8_per_token`` and back), in float32."""
  x8, scale = fp8_per_token(x)
  return x8.astype(jnp.float32) * scale[..., None]


def fp8_round_blocks(k: jax.Array, block_size: int) -> jax.Array:
  """Index keys ``[B, S, D]`` as FP8 scores see them (``fp8_per_block`` and back), in
  float32. (Index pages ``[P, Bk, D]`` are blocks: ``fp8_round_blocks(pages, Bk)``.)"""
  k8, scale = fp8_per_block(k, block_size)
  scale = jnp.repeat(scale, block_size, axis=1)[:, :k.shape[1]]
  return k8.astype(jnp.float32) * scale[..., None]


def index_topk(q_idx, k_idx, q_positions, kv_lengths, *, block_size, topk,
               chunk_size=DEFAULT_CHUNK):
  """Top-k KV blocks per (query, group): int32 [B,T,G,topk], -1 padded."""

  def chunk(pos, qi):
    scores = block_scores(qi, k_idx, pos, kv_lengths, block_size=block_size)
    return select_blocks(scores, own_block(pos, kv_lengths, block_size), topk)

  return map_query_chunks(chunk, chunk_size, q_positions, q_idx)


# ----------------------------------------------------------------------------- main branch


def _gather_blocks(x: jax.Array, ids: jax.Array, block_size: int) -> jax.Array:
  """x [B,S,G,D] (S a multiple of block_size), ids [B,c,G,k] -> [B,c,G,k,block_size,D]."""
  b, s, g, d = x.shape
  xb = x.reshape(b, s // block_size, block_size, g, d).transpose(0, 3, 1, 2, 4)
  bi = jnp.arange(b)[:, None, None, None]
  gi = jnp.arange(g)[None, None, :, None]
  return xb[bi, gi, ids]


def _support(ids, valid, q_positions, kv_lengths, block_size):
  """Visible keys of the selected blocks: bool [B,c,G,k,Bk]."""
  key_pos = ids[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
  vis = key_visible(key_pos, q_positions[:, :, None, None, None],
                    kv_lengths[:, None, None, None, None])
  return valid[..., None] & vis


def _masked_softmax_stats(s, mask, axes):
  """Safe max and sum of exp over ``axes`` for masked logits; fully masked rows give l = 0."""
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=axes, keepdims=True)
  # Only "no visible key" (-inf) is replaced: a NaN or +Inf logit makes the row NaN, as in
  # the kernels.
  m = lax.stop_gradient(jnp.where(m == -jnp.inf, 0.0, m))
  p = jnp.exp(s - m)
  return s, m, p, jnp.sum(p, axis=axes, keepdims=True)


def sparse_attention(q, k, v, block_indices, q_positions, kv_lengths, *, block_size, scale,
                     chunk_size=DEFAULT_CHUNK):
  """Exact attention over the selected blocks. Returns (out [B,T,Hq,Dv], lse f32 [B,T,Hq])."""
  b, t, hq, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  dv = v.shape[-1]
  hpg = hq // g
  nb = cdiv(s_len, block_size)
  k = _pad_axis(k, 1, nb * block_size)
  v = _pad_axis(v, 1, nb * block_size)
  valid = valid_block_mask(block_indices, nb)

  def chunk(pos, qc, ids, val):
    c = qc.shape[1]
    ids0 = jnp.where(val, ids, 0)
    kg = _gather_blocks(k, ids0, block_size)  # [B,c,G,k,Bk,D]
    vg = _gather_blocks(v, ids0, block_size)
    support = _support(ids0, val, pos, kv_lengths, block_size)  # [B,c,G,k,Bk]
    # Masked keys' values may hold anything (unwritten cache: NaN, Inf): 0 * NaN is NaN, so
    # they are zeroed; a query that sees a non-finite value gets NaN (as in the kernels).
    finite = jnp.all(jnp.isfinite(vg), axis=-1)
    sees_bad = jnp.any(support & ~finite, axis=(-2, -1))  # [B,c,G]
    vg = jnp.where(support[..., None] & finite[..., None], vg, jnp.zeros((), vg.dtype))
    mask = support[:, :, :, None]  # [B,c,G,1,k,Bk]
    qg = qc.reshape(b, c, g, hpg, d)
    s = jnp.einsum("bcghd,bcgknd->bcghkn", qg, kg, preferred_element_type=jnp.float32) * scale
    _, m, p, l = _masked_softmax_stats(s, mask, (-2, -1))
    o = jnp.einsum("bcghkn,bcgknd->bcghd", p, vg.astype(jnp.float32))
    l = l[..., 0, 0]
    has = l != 0  # NaN (a visible NaN/Inf logit) is not "no keys"
    o = o / jnp.where(has, l, 1.0)[..., None]
    lse = jnp.where(has, m[..., 0, 0] + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)
    o = jnp.where(sees_bad[..., None, None], jnp.nan, o)  # the LSE (of the logits) stays
    return o.reshape(b, c, hq, dv).astype(q.dtype), lse.reshape(b, c, hq)

  return map_query_chunks(chunk, chunk_size, q_positions, q, block_indices, valid)


def msa_attention(q, k, v, q_idx, k_idx, q_positions, kv_lengths, *, block_size, topk, scale):
  """Index branch then main branch. Returns (out, lse, block_indices)."""
  ids = index_topk(q_idx, k_idx, q_positions, kv_lengths, block_size=block_size, topk=topk)
  out, lse = sparse_attention(q, k, v, ids, q_positions, kv_lengths, block_size=block_size,
                              scale=scale)
  return out, lse, ids


# ----------------------------------------------------------------------------- indexer KL loss


def indexer_kl_loss(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths, *, block_size,
                    scale, chunk_size=DEFAULT_CHUNK):
  """KL(teacher || index distribution) over the token support of the selected blocks (§5).

  ``L = 1/(N*G) * sum_{t,g} KL(P_teacher[g,t] || P_idx[g,t])`` where N counts the
  non-padding queries. The teacher (group mean of the main-branch softmaxes renormalised on
  the support) uses detached ``q``/``k``; gradients flow to ``q_idx`` and ``k_idx`` only.
  """
  q = lax.stop_gradient(q)
  k = lax.stop_gradient(k)
  b, t, hq, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  di = q_idx.shape[-1]
  hpg = hq // g
  nb = cdiv(s_len, block_size)
  k = _pad_axis(k, 1, nb * block_size)
  k_idx = _pad_axis(k_idx, 1, nb * block_size)
  k_idx_g = jnp.broadcast_to(k_idx[:, :, None, :], (b, nb * block_size, g, di))
  valid = valid_block_mask(block_indices, nb)
  index_scale = 1.0 / jnp.sqrt(jnp.float32(di))

  def chunk(pos, qc, qic, ids, val):
    c = qc.shape[1]
    ids0 = jnp.where(val, ids, 0)
    mask = _support(ids0, val, pos, kv_lengths, block_size)  # [B,c,G,k,Bk]
    # Masked keys may hold anything (NaN past the length): zeroed, so no gradient through
    # them turns into 0 * NaN.
    zero = lambda x: jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
    kg = zero(_gather_blocks(k, ids0, block_size))
    kig = zero(_gather_blocks(k_idx_g, ids0, block_size))
    qg = qc.reshape(b, c, g, hpg, d)
    s_main = jnp.einsum("bcghd,bcgknd->bcghkn", qg, kg,
                        preferred_element_type=jnp.float32) * scale
    _, _, p_main, l_main = _masked_softmax_stats(s_main, mask[:, :, :, None], (-2, -1))
    p_teacher = jnp.mean(p_main / jnp.where(l_main > 0, l_main, 1.0), axis=3)  # [B,c,G,k,Bk]
    s_idx = jnp.einsum("bcgd,bcgknd->bcgkn", qic, kig,
                       preferred_element_type=jnp.float32) * index_scale
    s_idx, m_idx, _, l_idx = _masked_softmax_stats(s_idx, mask, (-2, -1))
    log_p_idx = s_idx - m_idx - jnp.log(jnp.where(l_idx > 0, l_idx, 1.0))
    log_p_idx = jnp.where(mask, log_p_idx, 0.0)
    kl = jnp.sum(p_teacher * (jnp.log(jnp.where(p_teacher > 0, p_teacher, 1.0)) - log_p_idx),
                 axis=(-2, -1))
    rows = jnp.any(mask, axis=(-2, -1))  # [B,c,G]
    return jnp.where(rows, kl, 0.0), rows

  kl, rows = map_query_chunks(chunk, chunk_size, q_positions, q, q_idx, block_indices, valid)
  num_queries = jnp.sum(jnp.any(rows, axis=-1))
  return jnp.sum(kl) / (jnp.maximum(num_queries, 1) * g).astype(jnp.float32)

