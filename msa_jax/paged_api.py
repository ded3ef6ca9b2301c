"""Public API of MSA decode on paged caches (``msa_jax.paged`` layouts; docs/msa.md §6).

Page size = block size Bk, so a selected block id ``j`` of sequence b is the sequence's j-th
page, ``page_table[b, j]``: selections are *logical* block ids, exactly the ids the contiguous
API returns for the same tokens. 1 to ``MAX_DECODE_QUERIES`` query tokens per sequence (decode,
speculative / multi-token-prediction verification); by default query i of q sits at position
``lengths[b] - q + i`` (``lengths`` count the new tokens, already written to the pages).

Arguments are checked as in the contiguous API (``checks.py``): shapes, dtypes and static arguments before anything is
traced, ``ValueError`` naming the argument; page ids, block ids and lengths are range-checked
when concrete (outside ``jit``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msa_jax import api
from msa_jax import checks
from msa_jax import paged
from msa_jax import reference
from msa_jax import schedule as sched

MAX_DECODE_QUERIES = checks.MAX_DECODE_QUERIES


# ----------------------------------------------------------------------------- index branch


def _paged_index_topk(q_idx, index_pages, page_table, lengths, q_positions, *, block_size,
                      topk, impl, interpret):
  if impl == "xla":
    k_idx = paged.gather_pages(index_pages, page_table, lengths)
    return reference.index_topk(q_idx, k_idx, q_positions, lengths, block_size=block_size,
                                topk=topk)
  if impl == "pallas_gpu":
    from msa_jax.ops.index_topk import gpu_triton_paged as kernel
    return kernel.paged_index_topk(q_idx, index_pages, page_table, q_positions, lengths,
                                   block_size=block_size, topk=topk, interpret=interpret)
  from msa_jax.ops.index_topk import tpu_paged as kernel
  scores = kernel.paged_block_scores(q_idx, index_pages, page_table, q_positions, lengths,
                                     block_size=block_size, interpret=interpret)
  return reference.select_blocks(scores, reference.own_block(q_positions, lengths, block_size),
                                 topk)


def paged_index_topk(q_idx, index_pages, page_table, lengths, *, block_size=128, topk=16,
                     q_positions=None, implementation=None, interpret=False, score_dtype=None):
  """Top-k blocks per (query, group) over all pages of each sequence (docs/msa.md §3, paged).

  Args:
    q_idx: [B, q, G, Di] index queries of the q (1-16) newest tokens, one head per KV group.
    index_pages: [P, Bk, Di] index-key pages (``PagedCache.index_pages``).
    page_table: int [B, max_pages] pages of each sequence in token order (-1 = none).
    lengths: int [B] tokens cached per sequence, the q new ones included.
    block_size: Bk, which is also the page size.
    topk: blocks per (query, group), the query's own block included.
    q_positions: int [B, q] (default: query i at ``lengths[b] - q + i``); < 0 = padding.
    implementation, interpret, score_dtype: as in ``msa_jax.index_topk``.

  Returns:
    int32 [B, q, G, topk] logical block ids (block j = the sequence's page ``page_table[b, j]``),
    valid ids first in unspecified order, -1 padding. Equal as sets to ``msa_jax.index_topk``
    on the contiguous keys.
  """
  block_size, topk = checks.check_static(block_size, topk)
  checks.check_paged_index(q_idx, index_pages, block_size)
  b, t = q_idx.shape[:2]
  page_table, lengths = checks.check_page_table(page_table, lengths, b, block_size, index_pages.shape[0])
  q_positions = checks.resolve_q_positions(q_positions, lengths, b, t)
  impl = checks.resolve_implementation(implementation, interpret)
  q_idx, index_pages = _score_inputs(q_idx, index_pages, score_dtype)
  if checks.is_empty(b):
    return jnp.full((0, t, q_idx.shape[2], topk), -1, jnp.int32)
  return _paged_index_topk(q_idx, index_pages, page_table, lengths, q_positions,
                           block_size=block_size, topk=topk, impl=impl, interpret=interpret)


def _score_inputs(q_idx, index_pages, score_dtype):
  """Index queries and pages as ``score_dtype`` scores them: FP8 rounds queries per token and
  pages per page (a page is a block), as ``msa_jax.index_topk`` rounds contiguous keys; the
  decode kernels then run on the rounded values, exact in their dtype."""
  if checks.check_score_dtype(score_dtype) is None:
    return q_idx, index_pages
  pages = reference.fp8_round_blocks(index_pages, index_pages.shape[1])
  return api.fp8_rounded(q_idx), pages.astype(index_pages.dtype)


# ----------------------------------------------------------------------------- main branch


def _paged_sparse_decode(q, k_pages, v_pages, page_table, lengths, block_indices, q_positions,
                         *, block_size, scale, impl, interpret):
  if impl == "xla":
    k = paged.gather_pages(k_pages, page_table, lengths)
    v = paged.gather_pages(v_pages, page_table, lengths)
    return reference.sparse_attention(q, k, v, block_indices, q_positions, lengths,
                                      block_size=block_size, scale=scale)
  if impl == "pallas_gpu":  # two kernels: partials (each compacting its row), their merge
    from msa_jax.ops.sparse_attention import gpu_triton_paged as kernel
    return kernel.paged_sparse_decode(q, k_pages, v_pages, page_table, block_indices,
                                      q_positions, lengths, block_size=block_size, scale=scale,
                                      interpret=interpret)
  ids, counts = sched.compact_selection(block_indices, page_table.shape[1])
  from msa_jax.ops.sparse_attention import tpu_paged as kernel
  partial_out, partial_lse = kernel.paged_sparse_decode_partials(
      q, k_pages, v_pages, page_table, ids, counts, q_positions, lengths,
      block_size=block_size, scale=scale, interpret=interpret)
  written = jnp.ones((*block_indices.shape[:3], partial_out.shape[0]), bool)
  return sched.combine(partial_out, partial_lse, written, q.dtype)


def paged_sparse_decode(q, k_pages, v_pages, page_table, lengths, block_indices, *,
                        block_size=128, scale=None, q_positions=None, return_lse=False,
                        implementation=None, interpret=False):
  """Exact attention of each new token over the visible keys of its selected pages
  (docs/msa.md §4).

  Args:
    q: [B, q, Hq, D] the q (1-16) newest tokens' queries; Hq a multiple of G.
    k_pages: [P, Bk, G, D], v_pages: [P, Bk, G, Dv] KV pages (``PagedCache``).
    page_table, lengths, q_positions: as in ``paged_index_topk``.
    block_indices: int [B, q, G, topk] logical block ids per (query, group), -1 = none;
      repeats count once.
    block_size: Bk = the page size. scale: logit scale (default 1/sqrt(D)).
    return_lse: also return the float32 log-sum-exp [B, q, Hq].
    implementation, interpret: as in ``msa_jax.sparse_attention``.

  Returns:
    out [B, q, Hq, Dv] in q's dtype (and lse); padding queries get 0 (lse -inf). Only
    keys before ``lengths[b]`` are read into any output: stale page contents never leak.
  """
  block_size, _ = checks.check_static(block_size)
  checks.check_paged_kv(q, k_pages, v_pages, block_size)
  b, t, _, d = q.shape
  page_table, lengths = checks.check_page_table(page_table, lengths, b, block_size, k_pages.shape[0])
  checks.check_block_indices(block_indices, b, t, k_pages.shape[2], page_table.shape[1])
  q_positions = checks.resolve_q_positions(q_positions, lengths, b, t)
  scale = checks.resolve_scale(scale, d)
  impl = checks.resolve_implementation(implementation, interpret)
  if checks.is_empty(b):
    out = jnp.zeros((0, t, q.shape[2], v_pages.shape[3]), q.dtype)
    lse = jnp.zeros((0, t, q.shape[2]), jnp.float32)
    return (out, lse) if return_lse else out
  out, lse = _paged_sparse_decode(q, k_pages, v_pages, page_table, lengths,
                                  jnp.asarray(block_indices, jnp.int32), q_positions,
                                  block_size=block_size, scale=scale, impl=impl,
                                  interpret=interpret)
  return (out, lse) if return_lse else out


def paged_msa_decode(q, q_idx, k_pages, v_pages, index_pages, page_table, lengths, *,
                     block_size=128, topk=16, scale=None, q_positions=None,
                     return_indices=False, return_lse=False, implementation=None,
                     interpret=False, score_dtype=None):
  """MSA decode on a paged cache: ``paged_index_topk`` then ``paged_sparse_decode``
  (``score_dtype`` as in ``msa_jax.index_topk``).

  The cache arguments are a ``PagedCache``'s fields in order, so
  ``paged_msa_decode(q, q_idx, *cache)`` works. Shapes as in those two functions. Returns
  out [B, q, Hq, Dv], then the int32 [B, q, G, topk] selection when ``return_indices`` and the
  float32 lse [B, q, Hq] when ``return_lse``.
  """
  block_size, topk = checks.check_static(block_size, topk)
  checks.check_paged_kv(q, k_pages, v_pages, block_size)
  b, t, _, d = q.shape
  if index_pages is None:
    raise ValueError("index_pages must be an array [num_pages, page_size, index_dim]; got "
                     "None (a cache without an index branch cannot run MSA)")
  checks.check_paged_index(q_idx, index_pages, block_size, k_pages.shape[2], k_pages.shape[0])
  if q_idx.shape[:2] != (b, t):
    raise ValueError(f"q_idx must have [batch, q_len] = [{b}, {t}] (as q); got shape "
                     f"{checks.shape_of(q_idx)}")
  page_table, lengths = checks.check_page_table(page_table, lengths, b, block_size, k_pages.shape[0])
  q_positions = checks.resolve_q_positions(q_positions, lengths, b, t)
  scale = checks.resolve_scale(scale, d)
  impl = checks.resolve_implementation(implementation, interpret)
  if checks.is_empty(b):
    ids = jnp.full((0, t, k_pages.shape[2], topk), -1, jnp.int32)
    out = jnp.zeros((0, t, q.shape[2], v_pages.shape[3]), q.dtype)
    lse = jnp.zeros((0, t, q.shape[2]), jnp.float32)
  else:
    q_idx, index_pages = _score_inputs(q_idx, index_pages, score_dtype)
    ids = _paged_index_topk(jax.lax.stop_gradient(q_idx), index_pages, page_table, lengths,
                            q_positions, block_size=block_size, topk=topk, impl=impl,
                            interpret=interpret)
    out, lse = _paged_sparse_decode(q, k_pages, v_pages, page_table, lengths, ids,
                                    q_positions, block_size=block_size, scale=scale,
                                    impl=impl, interpret=interpret)
  result = (out,)
  if return_indices:
    result += (ids,)
  if return_lse:
    result += (lse,)
  return result[0] if len(result) == 1 else result


__all__ = ("paged_index_topk", "paged_sparse_decode", "paged_msa_decode", "MAX_DECODE_QUERIES")
