"""Full (dense) causal attention with MSA's visibility rule, in bounded memory.

``full_attention(q, k, v, q_positions=..., kv_lengths=...)``: query t of sequence b at position
``p = q_positions[b, t]`` attends to every key ``j <= p`` with ``j < kv_lengths[b]`` (the rule
of ``msa_attention``, without the selection); a query with no visible key (padding, ``p < 0``)
gets 0. This is the attention of MiniMax-M3's full-attention layers during prefill, chunked
prefill and decode, over a cache that is longer than what it holds. No ``[T, S]`` score matrix
is ever built. Implementations:

* ``"xla"``: flash attention written in ``jax.numpy``: query chunks of ``q_chunk``, each an
  online softmax over key chunks of ``k_chunk`` up to the last key any of its queries sees.
  Any backend, any dtype; memory ``O(B * Hq * q_chunk * k_chunk)``.
* ``"pallas_gpu"``: decode (at most ``MAX_DECODE_QUERIES`` queries per sequence) runs MSA's
  query-outer split-K decode kernel over *all* blocks (``ops/sparse_attention/gpu_triton_paged``):
  each group's keys are read once for its query heads. Longer query ranges run cuDNN flash
  attention (bfloat16/float16, head dim <= 128) in two calls merged by their LSEs: the queries
  against the cached prefix (no causal mask, ``key_value_seq_lengths`` = prefix length) and
  against their own chunk (cuDNN's causal mask, which is aligned top-left). That needs the
  layout a model produces: sequence b's queries at consecutive positions ending at
  ``kv_lengths[b] - 1``, padding (``p < 0``) after them. Other layouts, and inputs cuDNN does
  not take, run the ``"xla"`` path (checked under ``jit`` too, with ``lax.cond``).
* ``"pallas_tpu"``: a Pallas flash-attention kernel (``ops/full_attention/tpu.py``)
  whose mask comes from the positions and lengths (splash attention's masks are static), for
  every layout, prefill and decode alike.

``paged_full_attention`` is the decode over a paged cache (``msa_jax.paged`` layout) without
gathering its pages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from msa_jax import checks
from msa_jax import reference
from msa_jax import schedule as sched

MAX_DECODE_QUERIES = checks.MAX_DECODE_QUERIES
Q_CHUNK = 256
K_CHUNK = 1024
# cuDNN flash attention's supported inputs (Hopper/Ampere): half-precision, head dim <= 128.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128


def full_attention(q, k, v, *, scale=None, q_positions=None, kv_lengths=None,
                   implementation=None, interpret=False, q_chunk=Q_CHUNK, k_chunk=K_CHUNK):
  """Dense attention of ``q [B,T,Hq,D]`` over ``k [B,S,G,D]``, ``v [B,S,G,Dv]`` (GQA: query
  head h uses group ``h // (Hq/G)``), keys visible by MSA's rule. Returns ``[B,T,Hq,Dv]`` in
  q's dtype. Arguments as in ``msa_jax.msa_attention``; ``q_chunk``/``k_chunk`` size the
  ``"xla"`` path's tiles."""
  checks.check_qkv(q, k, v)
  b, t, _, d = q.shape
  q_positions, kv_lengths = checks.resolve_positions(q_positions, kv_lengths, b, t, k.shape[1])
  scale = checks.resolve_scale(scale, d)
  impl = checks.resolve_implementation(implementation, interpret)
  q_chunk = checks.check_positive_int("q_chunk", q_chunk)
  k_chunk = checks.check_positive_int("k_chunk", k_chunk)
  if checks.is_empty(b, t):
    return jnp.zeros((b, t, q.shape[2], v.shape[3]), q.dtype)
  if impl == "pallas_gpu" and t <= MAX_DECODE_QUERIES:
    return _decode_gpu(q, k, v, q_positions, kv_lengths, scale=scale, interpret=interpret)
  if impl == "pallas_gpu" and not interpret and _cudnn_supports(q, k, v):
    structured = _bottom_right(q_positions, kv_lengths)
    return lax.cond(
        structured,
        lambda: _cudnn(q, k, v, q_positions, kv_lengths, scale),
        lambda: _flash_xla(q, k, v, q_positions, kv_lengths, scale, q_chunk, k_chunk))
  if impl == "pallas_tpu":
    from msa_jax.ops.full_attention import tpu as flash_attention
    return flash_attention.flash_attention(q, k, v, q_positions, kv_lengths, scale=scale,
                                           interpret=interpret)
  return _flash_xla(q, k, v, q_positions, kv_lengths, scale, q_chunk, k_chunk)


# ----------------------------------------------------------------------------- XLA flash


def _flash_xla(q, k, v, q_positions, kv_lengths, scale, q_chunk, k_chunk):
  b, t, hq, d = q.shape
  s, g, dv = k.shape[1], k.shape[2], v.shape[3]
  hpg = hq // g
  cq, ck = min(q_chunk, t), min(k_chunk, s)
  nq, nk = reference.cdiv(t, cq), reference.cdiv(s, ck)
  pad_t, pad_s = nq * cq - t, nk * ck - s
  q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
  pos = jnp.pad(q_positions, ((0, 0), (0, pad_t)), constant_values=-1)
  k = jnp.pad(k, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  qs = jnp.moveaxis(q.reshape(b, nq, cq, g, hpg, d), 1, 0)  # [nq, B, cq, G, hpg, D]
  ps = jnp.moveaxis(pos.reshape(b, nq, cq), 1, 0)  # [nq, B, cq]

  def one_chunk(args):
    qc, pc = args
    # Key chunks past the last key any query of this chunk sees are never read.
    last = jnp.max(jnp.minimum(pc, kv_lengths[:, None] - 1))
    num_chunks = jnp.where(last >= 0, last // ck + 1, 0)

    def step(carry, j):
      return lax.cond(j < num_chunks, lambda: attend(j, *carry), lambda: carry), None

    def attend(j, m, l, acc, bad):
      kc = lax.dynamic_slice_in_dim(k, j * ck, ck, axis=1)  # [B, ck, G, D]
      vc = lax.dynamic_slice_in_dim(v, j * ck, ck, axis=1)
      key = j * ck + jnp.arange(ck, dtype=jnp.int32)
      sc = jnp.einsum("bqghd,bkgd->bghqk", qc, kc, precision=precision,
                      preferred_element_type=jnp.float32) * scale
      visible = ((key[None, None, :] <= pc[:, :, None])
                 & (key[None, None, :] < kv_lengths[:, None, None]))  # [B, cq, ck]
      sc = jnp.where(visible[:, None, None], sc, -jnp.inf)
      # Values a query cannot see may hold anything (unwritten cache, NaN): 0 * NaN must not
      # leak through P @ V. Non-finite value rows are zeroed; a query that sees one gets NaN.
      finite = jnp.all(jnp.isfinite(vc), axis=-1)  # [B, ck, G]
      vc = jnp.where(finite[..., None], vc, jnp.zeros((), vc.dtype))
      seen = jnp.any(visible[:, None] & ~jnp.moveaxis(finite, 2, 1)[:, :, None], axis=-1)
      bad = bad | seen[:, :, None]  # [B, G, 1, cq]
      m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      e = jnp.exp(sc - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = l * alpha + jnp.sum(e, axis=-1)
      acc = acc * alpha[..., None] + jnp.einsum(
          "bghqk,bkgd->bghqd", e.astype(v.dtype), vc, precision=precision,
          preferred_element_type=jnp.float32)
      return m_new, l, acc, bad

    init = (jnp.full((b, g, hpg, cq), -jnp.inf, jnp.float32),
            jnp.zeros((b, g, hpg, cq), jnp.float32), jnp.zeros((b, g, hpg, cq, dv), jnp.float32),
            jnp.zeros((b, g, 1, cq), bool))
    # A scan with a cond (not a loop with a dynamic bound) keeps the path differentiable.
    (_, l, acc, bad), _ = lax.scan(step, init, jnp.arange(nk))
    out = acc / jnp.where(l != 0, l, 1.0)[..., None]  # no visible key: 0; NaN l stays NaN
    out = jnp.where(bad[..., None], jnp.nan, out)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, cq, hq, dv)

  out = lax.map(one_chunk, (qs, ps))  # [nq, B, cq, Hq, Dv]
  return jnp.moveaxis(out, 0, 1).reshape(b, nq * cq, hq, dv)[:, :t].astype(q.dtype)


# ----------------------------------------------------------------------------- GPU paths


def _decode_gpu(q, k, v, q_positions, kv_lengths, *, scale, interpret):
  """Split-K decode over every block of a contiguous cache (seen as one page per block)."""
  b, s, g, d = k.shape
  # Pages of the largest power of two <= 128 that divides S: a reshape, no copy (a cache whose
  # length is not a multiple of 16 is padded, which copies it).
  bk = next((size for size in (128, 64, 32, 16) if s % size == 0), 16)
  nb = reference.cdiv(s, bk)
  if nb * bk != s:
    k = jnp.pad(k, ((0, 0), (0, nb * bk - s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, nb * bk - s), (0, 0), (0, 0)))
  k = k.reshape(b * nb, bk, g, d)
  v = v.reshape(b * nb, bk, g, v.shape[3])
  table = jnp.arange(b * nb, dtype=jnp.int32).reshape(b, nb)
  return _decode_pages(q, k, v, table, q_positions, kv_lengths, scale=scale,
                       interpret=interpret)


def _decode_pages(q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, scale,
                  interpret):
  from msa_jax.ops.sparse_attention import gpu_triton_paged as paged_sparse_decode
  b, t, hq, _ = q.shape
  g, bk = k_pages.shape[2], k_pages.shape[1]
  nb = page_table.shape[1]
  # Every block up to the query's last visible key, in order: the selection of dense attention.
  last = jnp.minimum(q_positions, kv_lengths[:, None] - 1)  # [B, T]
  counts = jnp.where(last >= 0, last // bk + 1, 0).astype(jnp.int32)
  counts = jnp.broadcast_to(counts[:, :, None], (b, t, g))
  ids = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (b, t, g, nb))
  return paged_sparse_decode.paged_sparse_decode(
      q, k_pages, v_pages, page_table, ids, q_positions, kv_lengths, block_size=bk,
      scale=scale, counts=counts, interpret=interpret)[0]


def paged_full_attention(q, k_pages, v_pages, page_table, lengths, *, scale=None,
                         q_positions=None, implementation=None, interpret=False):
  """Full attention of 1-``MAX_DECODE_QUERIES`` queries per sequence over a paged cache
  (pages ``[num_pages, Bk, G, D]``, ``page_table [B, max_pages]``, ``lengths [B]`` counting
  the new tokens), without gathering the pages. Positions default to the last ``T`` tokens."""
  b, t, _, d = q.shape
  if not 1 <= t <= MAX_DECODE_QUERIES:
    raise ValueError(f"q must hold 1 to {MAX_DECODE_QUERIES} query tokens per sequence for "
                     f"paged full attention; got shape {tuple(q.shape)}")
  bk = k_pages.shape[1]
  q_positions, lengths = checks.resolve_positions(q_positions, lengths, b, t,
                                                page_table.shape[1] * bk)
  scale = checks.resolve_scale(scale, d)
  impl = checks.resolve_implementation(implementation, interpret)
  if checks.is_empty(b):
    return jnp.zeros((0, t, q.shape[2], v_pages.shape[3]), q.dtype)
  if impl == "pallas_gpu":
    return _decode_pages(q, k_pages, v_pages, jnp.clip(page_table, 0, k_pages.shape[0] - 1),
                         q_positions, lengths, scale=scale, interpret=interpret)
  from msa_jax import paged
  k, v = (paged.gather_pages(pages, page_table, lengths) for pages in (k_pages, v_pages))
  if impl == "pallas_tpu":
    from msa_jax.ops.full_attention import tpu as flash_attention
    return flash_attention.flash_attention(q, k, v, q_positions, lengths, scale=scale,
                                           interpret=interpret)
  return _flash_xla(q, k, v, q_positions, lengths, scale, Q_CHUNK, K_CHUNK)


def _cudnn_supports(q, k, v) -> bool:
  return (q.dtype in _CUDNN_DTYPES and q.shape[3] <= _CUDNN_MAX_HEAD_DIM
          and v.shape[3] == q.shape[3] and q.shape[3] % 8 == 0)


def _layout(q_positions, kv_lengths):
  """Per sequence: queries n (positions >= 0) and the prefix before them, kv_lengths - n."""
  n = jnp.sum(q_positions >= 0, axis=1).astype(jnp.int32)
  return n, (kv_lengths - n).astype(jnp.int32)


def _bottom_right(q_positions, kv_lengths):
  """True iff every sequence's queries sit at prefix + t (t < n), padding (-1...) after."""
  n, prefix = _layout(q_positions, kv_lengths)
  t = jnp.arange(q_positions.shape[1], dtype=jnp.int32)[None, :]
  ok = jnp.where(t < n[:, None], q_positions == prefix[:, None] + t, q_positions < 0)
  return jnp.all(ok) & jnp.all(prefix >= 0)


def _cudnn(q, k, v, q_positions, kv_lengths, scale):
  """cuDNN flash attention for the bottom-right layout: prefix part + own-chunk part."""
  b, t, hq, _ = q.shape
  s, g = k.shape[1], k.shape[2]
  n, prefix = _layout(q_positions, kv_lengths)
  rows = jnp.arange(t, dtype=jnp.int32)[None, :]
  # The chunk's own keys and values, in chunk order (rows past n are zeroed: never garbage).
  at = jnp.clip(prefix[:, None] + rows, 0, s - 1)
  own_valid = (rows < n[:, None])[:, :, None, None]
  k_own = jnp.where(own_valid, jnp.take_along_axis(k, at[:, :, None, None], axis=1), 0)
  v_own = jnp.where(own_valid, jnp.take_along_axis(v, at[:, :, None, None], axis=1), 0)
  # cuDNN needs at least one query and key per sequence; empty rows are dropped below.
  one = jnp.maximum(n, 1)
  attend = lambda k_, v_, kv_len, causal: jax.nn.dot_product_attention(
      q, k_, v_, scale=scale, is_causal=causal, query_seq_lengths=one,
      key_value_seq_lengths=kv_len, implementation="cudnn", return_residual=True)
  own_out, own_lse = attend(k_own, v_own, one, True)
  pre_out, pre_lse = attend(k, v, jnp.maximum(prefix, 1), False)
  query_valid = rows < n[:, None]  # [B, T]
  valid = jnp.stack([jnp.broadcast_to(query_valid[:, :, None], (b, t, g)),
                     jnp.broadcast_to((query_valid & (prefix[:, None] > 0))[:, :, None],
                                      (b, t, g))], axis=-1)
  partial_out = jnp.stack([own_out, pre_out])
  partial_lse = jnp.stack([own_lse, pre_lse]).astype(jnp.float32)
  return sched.combine(partial_out, partial_lse, valid, q.dtype)[0]


__all__ = ["full_attention", "paged_full_attention", "MAX_DECODE_QUERIES"]
