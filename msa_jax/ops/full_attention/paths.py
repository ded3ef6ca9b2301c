"""``full_attention``'s paths, one per (implementation, query count) row of
``msa_jax.dispatch``.

Each takes ``q [B, T, Hq, D]``, a ``KV`` source with ``k``, ``v`` (contiguous or paged) and
the query positions, and returns ``[B, T, Hq, Dv]`` in q's dtype. ``q_chunk``/``k_chunk``
size the XLA flash path's tiles (also the fallback of the cuDNN path).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from msa_jax import reference
from msa_jax.ops.full_attention import gpu_cudnn
from msa_jax.ops.full_attention import xla as xla_flash


def xla(q, source, q_positions, *, scale, interpret, q_chunk, k_chunk):
  del interpret
  source = source.contiguous()
  return xla_flash.flash_attention(q, source.k, source.v, q_positions, source.lengths, scale,
                                   q_chunk, k_chunk)


def gpu_prefill(q, source, q_positions, *, scale, interpret, q_chunk, k_chunk):
  """cuDNN for the layout a model produces (checked under ``jit`` too, with ``lax.cond``),
  the XLA flash path for other layouts and inputs cuDNN does not take."""
  source = source.contiguous()
  k, v, lengths = source.k, source.v, source.lengths
  flash = lambda: xla_flash.flash_attention(q, k, v, q_positions, lengths, scale, q_chunk,
                                            k_chunk)
  if interpret or not gpu_cudnn.supports(q, k, v):
    return flash()
  return lax.cond(gpu_cudnn.bottom_right(q_positions, lengths),
                  lambda: gpu_cudnn.attention(q, k, v, q_positions, lengths, scale), flash)


def gpu_decode(q, source, q_positions, *, scale, interpret, q_chunk, k_chunk):
  """MSA's split-K decode kernel over *every* block up to each query's last visible key: each
  group's keys are read once for its query heads. A contiguous cache is read as pages of the
  largest power of two <= 128 that divides its length (a reshape; other lengths are padded,
  which copies)."""
  del q_chunk, k_chunk
  if not source.paged:
    s = source.k.shape[1]
    page = next((size for size in (128, 64, 32, 16) if s % size == 0), 16)
    pages = source.as_pages(page)
    nb = reference.cdiv(s, page)
    table = jnp.arange(q.shape[0] * nb, dtype=jnp.int32).reshape(q.shape[0], nb)
    source = pages._replace(page_table=table)
  return _every_block(q, source, q_positions, scale=scale, interpret=interpret)


def _every_block(q, source, q_positions, *, scale, interpret):
  from msa_jax.ops.sparse_attention import gpu_triton_paged as kernel
  b, t, _, _ = q.shape
  num_pages, bk, g = source.k.shape[:3]
  page_table = jnp.clip(source.page_table, 0, num_pages - 1)
  nb = page_table.shape[1]
  # Every block up to the query's last visible key, in order: the selection of dense attention.
  last = jnp.minimum(q_positions, source.lengths[:, None] - 1)  # [B, T]
  counts = jnp.where(last >= 0, last // bk + 1, 0).astype(jnp.int32)
  counts = jnp.broadcast_to(counts[:, :, None], (b, t, g))
  ids = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (b, t, g, nb))
  return kernel.paged_sparse_decode(
      q, source.k, source.v, page_table, ids, q_positions, source.lengths, block_size=bk,
      scale=scale, counts=counts, interpret=interpret)[0]


def tpu(q, source, q_positions, *, scale, interpret, q_chunk, k_chunk):
  """A Pallas flash-attention kernel whose mask comes from the positions and lengths
  (splash attention's masks are static), for every layout, prefill and decode alike."""
  from msa_jax.ops.full_attention import tpu as kernel
  del q_chunk, k_chunk
  source = source.contiguous()
  return kernel.flash_attention(q, source.k, source.v, q_positions, source.lengths,
                                scale=scale, interpret=interpret)
