"""KV cache and index-key cache, contiguous or paged, docs/minimax_m3.md §3.4 and §3.6.

One ``Cache`` holds, per layer, the post-norm post-RoPE keys and raw values ``[B, S_max, G, D]``
and, for MSA layers, the index keys ``[B, S_max, Di]`` (one vector per token), plus the number
of tokens already cached per sequence. Prefill, chunked prefill and decode are one operation:
the new tokens of sequence b take positions ``lengths[b] + t`` (t < ``num_new[b]``; the rest of
a ragged batch are padding at position -1), are written at those positions, and attend to the
cache with ``kv_lengths = lengths + num_new``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Cache(NamedTuple):
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  index_k: tuple[jax.Array | None, ...]  # None for full-attention layers
  lengths: jax.Array  # int32 [B]

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]


def init_cache(config, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
  """An empty cache for ``batch`` sequences of up to ``max_len`` tokens."""
  return Cache(*_layer_buffers(config, (batch, max_len), dtype),
               lengths=jnp.zeros((batch,), jnp.int32))


def _layer_buffers(config, lead: tuple[int, int], dtype):
  """Zeroed (k, v, index_k) per layer, each ``[*lead, ...]`` (index_k None in full-attention
  layers): ``lead`` is (batch, max_len) for a contiguous cache, (num_pages, Bk) for pages."""
  kv = lambda: jnp.zeros((*lead, config.num_kv_heads, config.head_dim), dtype)
  return (tuple(kv() for _ in range(config.num_layers)),
          tuple(kv() for _ in range(config.num_layers)),
          tuple(jnp.zeros((*lead, config.index_head_dim), dtype) if sparse else None
                for sparse in config.sparse_layers))


def new_positions(lengths: jax.Array, q_len: int, num_new: jax.Array | None) -> jax.Array:
  """Absolute positions [B, T] of the new tokens; -1 marks padding (t >= num_new[b])."""
  t = jnp.arange(q_len, dtype=jnp.int32)[None, :]
  pos = lengths[:, None] + t
  if num_new is None:
    return pos
  return jnp.where(t < num_new[:, None], pos, -1)


def write(buffer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
  """Write ``new [B, T, ...]`` into ``buffer [B, S, ...]`` at ``positions``; -1 is dropped."""
  b, s = buffer.shape[:2]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], positions.shape)
  cols = jnp.where(positions >= 0, positions, s)  # out of range: dropped
  return buffer.at[rows, cols].set(new.astype(buffer.dtype), mode="drop")


class PagedModelCache(NamedTuple):
  """The caches of all layers in pages of ``Bk`` tokens (``msa_jax.paged`` layout, for serving).

  Per layer ``k``/``v`` pages ``[num_pages, Bk, G, D]`` and, for MSA layers, index-key pages
  ``[num_pages, Bk, Di]``; one ``page_table [B, max_pages]`` (from ``msa_jax.PageAllocator``)
  and ``lengths [B]`` shared by all layers: token p of row b sits in page
  ``page_table[b, p // Bk]``, slot ``p % Bk``, in every layer. The page size is the MSA block
  size, so a selected block is a page of the sequence.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  index_k: tuple[jax.Array | None, ...]
  page_table: jax.Array
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.page_table.shape[1] * self.k[0].shape[1]

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]


def init_paged_cache(config, *, num_pages: int, batch: int, max_pages: int,
                     dtype=jnp.float32) -> PagedModelCache:
  """Empty paged caches (all pages zero, page table -1) for ``batch`` rows."""
  return PagedModelCache(
      *_layer_buffers(config, (num_pages, config.index_block_size), dtype),
      page_table=jnp.full((batch, max_pages), -1, jnp.int32),
      lengths=jnp.zeros((batch,), jnp.int32))
