"""Full (dense) causal attention with MSA's visibility rule, in bounded memory.

``full_attention(q, k, v, q_positions=..., kv_lengths=...)``: query t of sequence b at position
``p = q_positions[b, t]`` attends to every key ``j <= p`` with ``j < kv_lengths[b]`` (the rule
of ``msa_attention``, without the selection); a query with no visible key (padding, ``p < 0``)
gets 0. This is the attention of MiniMax-M3's full-attention layers during prefill, chunked
prefill and decode, over a cache that is longer than what it holds. No ``[T, S]`` score matrix
is ever built. The keys are contiguous or paged (``page_table=``, as in ``msa_jax.api``;
pages of any size). Implementations (``msa_jax.dispatch``, ``ops/full_attention/``):

* ``"xla"``: flash attention written in ``jax.numpy`` (``ops/full_attention/xla.py``), any
  backend, any dtype; memory ``O(B * Hq * q_chunk * k_chunk)``.
* ``"pallas_gpu"``: decode (at most ``MAX_DECODE_QUERIES`` queries per sequence) runs MSA's
  query-outer split-K decode kernel over *all* blocks, pages read in place; longer query
  ranges run cuDNN flash attention (``ops/full_attention/gpu_cudnn.py``) for the layout a
  model produces, the ``"xla"`` path otherwise.
* ``"pallas_tpu"``: a Pallas flash-attention kernel (``ops/full_attention/tpu.py``) whose
  mask comes from the positions and lengths, prefill and decode alike.
"""

from __future__ import annotations

import jax.numpy as jnp

from msa_jax import checks
from msa_jax import dispatch
from msa_jax.source import KV

MAX_DECODE_QUERIES = checks.MAX_DECODE_QUERIES
Q_CHUNK = 256
K_CHUNK = 1024


def full_attention(q, k, v, *, scale=None, q_positions=None, kv_lengths=None, page_table=None,
                   implementation=None, interpret=False, q_chunk=Q_CHUNK, k_chunk=K_CHUNK):
  """Dense attention of ``q [B,T,Hq,D]`` over ``k [B,S,G,D]``, ``v [B,S,G,Dv]`` (GQA: query
  head h uses group ``h // (Hq/G)``), keys visible by MSA's rule. Returns ``[B,T,Hq,Dv]`` in
  q's dtype. Arguments as in ``msa_jax.msa_attention`` (with ``page_table``, k and v are
  pages ``[P, page_size, G, D]`` and ``kv_lengths`` is required); ``q_chunk``/``k_chunk``
  size the ``"xla"`` path's tiles."""
  if page_table is None:
    checks.check_qkv(q, k, v)
    b, t, _, d = q.shape
    q_positions, kv_lengths = checks.resolve_positions(q_positions, kv_lengths, b, t,
                                                       k.shape[1])
  else:
    checks.check_paged_kv(q, k, v, k.shape[1])
    b, t, _, d = q.shape
    if kv_lengths is None:
      raise ValueError("kv_lengths [batch] is required with page_table: the tokens cached per "
                       "sequence, the new ones included")
    page_table, kv_lengths = checks.check_page_table(page_table, kv_lengths, b, k.shape[1],
                                                     k.shape[0])
    q_positions = checks.resolve_q_positions(q_positions, kv_lengths, b, t)
  scale = checks.resolve_scale(scale, d)
  impl = checks.resolve_implementation(implementation, interpret)
  q_chunk = checks.check_positive_int("q_chunk", q_chunk)
  k_chunk = checks.check_positive_int("k_chunk", k_chunk)
  if checks.is_empty(b, t):
    return jnp.zeros((b, t, q.shape[2], v.shape[3]), q.dtype)
  source = KV(k=k, v=v, page_table=page_table, lengths=kv_lengths)
  return dispatch.path("full_attention", impl, t)(q, source, q_positions, scale=scale,
                                                   interpret=interpret, q_chunk=q_chunk,
                                                   k_chunk=k_chunk)


def paged_full_attention(q, k_pages, v_pages, page_table, lengths, *, scale=None,
                         q_positions=None, implementation=None, interpret=False):
  """``full_attention(q, k_pages, v_pages, page_table=page_table, kv_lengths=lengths, ...)``
  (kept for one release): positions default to the last ``T`` tokens before ``lengths``."""
  return full_attention(q, k_pages, v_pages, scale=scale, q_positions=q_positions,
                        kv_lengths=lengths, page_table=page_table,
                        implementation=implementation, interpret=interpret)


__all__ = ["full_attention", "paged_full_attention", "MAX_DECODE_QUERIES"]
