"""The keys an op reads, contiguous or paged: one type for both KV sources.

Paged is the general case: a contiguous cache is a paged one whose block ``j`` of row ``b``
is page ``b * num_blocks + j`` (a reshape, no page table), which is how the GPU decode
kernels read it; a paged cache becomes contiguous by gathering its pages (a copy), which is
how the prefill kernels and the XLA reference read it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from msa_jax import paged
from msa_jax import reference


class KV(NamedTuple):
  """Keys, values and index keys: contiguous ``[B, S, ...]`` (``page_table`` None) or pages
  ``[P, Bk, ...]`` listed per sequence by ``page_table int32 [B, max_pages]``.
  ``lengths int32 [B]``: valid keys per sequence. Arrays the op does not read are None."""
  k: Any = None
  v: Any = None
  k_idx: Any = None
  page_table: Any = None
  lengths: Any = None

  @property
  def paged(self) -> bool:
    return self.page_table is not None

  def _map(self, fn) -> KV:
    return self._replace(**{name: None if x is None else fn(x)
                            for name, x in zip(("k", "v", "k_idx"), self[:3])})

  def contiguous(self) -> KV:
    """``[B, max_pages * Bk, ...]`` in token order (zero past ``lengths``); self if contiguous."""
    if not self.paged:
      return self
    gathered = self._map(lambda x: paged.gather_pages(x, self.page_table, self.lengths))
    return gathered._replace(page_table=None)

  def as_pages(self, block_size: int) -> KV:
    """Pages of ``block_size`` tokens; a contiguous source as pages without a page table (row
    ``b``'s block ``j`` is page ``b * num_blocks + j``), its length padded to whole blocks."""
    if self.paged:
      return self

    def pages(x):
      b, s = x.shape[:2]
      nb = reference.cdiv(s, block_size)
      x = jnp.pad(x, ((0, 0), (0, nb * block_size - s)) + ((0, 0),) * (x.ndim - 2))
      return x.reshape(b * nb, block_size, *x.shape[2:])

    return self._map(pages)

  def num_blocks(self, block_size: int) -> int:
    """Blocks a row can hold: its pages, or its contiguous length in blocks."""
    if self.paged:
      return self.page_table.shape[1]
    return reference.cdiv(next(x for x in self[:3] if x is not None).shape[1], block_size)
