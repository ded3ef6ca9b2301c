"""The decode API of earlier releases, on paged caches: thin aliases of ``msa_jax.api``'s ops
with ``page_table=`` (kept for one release; new code calls ``msa_attention`` and friends).

Page size = block size Bk, so a selected block id ``j`` of sequence b is the sequence's j-th
page, ``page_table[b, j]``: selections are *logical* block ids, exactly the ids the contiguous
API returns for the same tokens. By default query i of q sits at position
``lengths[b] - q + i`` (``lengths`` count the new tokens, already written to the pages).
"""

from __future__ import annotations

from msa_jax import api
from msa_jax import checks

MAX_DECODE_QUERIES = checks.MAX_DECODE_QUERIES


def paged_index_topk(q_idx, index_pages, page_table, lengths, *, block_size=128, topk=16,
                     q_positions=None, implementation=None, interpret=False, score_dtype=None):
  """``index_topk(q_idx, index_pages, page_table=page_table, kv_lengths=lengths, ...)``:
  int32 [B, q, G, topk] logical block ids over all pages of each sequence, equal as sets to
  ``index_topk`` on the contiguous keys."""
  return api.index_topk(q_idx, index_pages, block_size=block_size, topk=topk,
                        q_positions=q_positions, kv_lengths=lengths, page_table=page_table,
                        implementation=implementation, interpret=interpret,
                        score_dtype=score_dtype)


def paged_sparse_decode(q, k_pages, v_pages, page_table, lengths, block_indices, *,
                        block_size=128, scale=None, q_positions=None, return_lse=False,
                        implementation=None, interpret=False):
  """``sparse_attention(q, k_pages, v_pages, block_indices, page_table=page_table,
  kv_lengths=lengths, ...)``: only keys before ``lengths[b]`` are read into any output, so
  stale page contents never leak."""
  return api.sparse_attention(q, k_pages, v_pages, block_indices, block_size=block_size,
                              scale=scale, q_positions=q_positions, kv_lengths=lengths,
                              page_table=page_table, return_lse=return_lse,
                              implementation=implementation, interpret=interpret)


def paged_msa_decode(q, q_idx, k_pages, v_pages, index_pages, page_table, lengths, *,
                     block_size=128, topk=16, scale=None, q_positions=None,
                     return_indices=False, return_lse=False, implementation=None,
                     interpret=False, score_dtype=None):
  """``msa_attention`` on a paged cache. The cache arguments are a ``PagedCache``'s fields in
  order, so ``paged_msa_decode(q, q_idx, *cache)`` works. Returns out [B, q, Hq, Dv], then the
  selection when ``return_indices`` and the lse when ``return_lse``."""
  return api.msa_attention(q, k_pages, v_pages, q_idx, index_pages, block_size=block_size,
                           topk=topk, scale=scale, q_positions=q_positions, kv_lengths=lengths,
                           page_table=page_table, return_indices=return_indices,
                           return_lse=return_lse, implementation=implementation,
                           interpret=interpret, score_dtype=score_dtype)


__all__ = ("paged_index_topk", "paged_sparse_decode", "paged_msa_decode", "MAX_DECODE_QUERIES")
