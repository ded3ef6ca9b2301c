"""Paged KV and index-key caches for serving (docs/msa.md §6 "Decode": page size = Bk).

Device side, one layer's cache as a pytree (``PagedCache``):

* ``k_pages [num_pages, Bk, G, D]``, ``v_pages [num_pages, Bk, G, Dv]``: keys and values, one
  page holds ``Bk`` consecutive tokens of one sequence;
* ``index_pages [num_pages, Bk, Di]``: the index keys of the same tokens (None for a layer
  without MSA);
* ``page_table int32 [B, max_pages]``: row b lists the pages of sequence (batch row) b in token
  order, -1 where no page is assigned; token ``p`` of row b lives in page
  ``page_table[b, p // Bk]`` at slot ``p % Bk``. Since the page size is the MSA block size, a
  selected block id is an index into the row: block ``j`` of sequence b is page
  ``page_table[b, j]``;
* ``lengths int32 [B]``: tokens cached per row.

Pages of one sequence may sit anywhere, in any order, and a page not listed in any row holds
garbage: readers mask every key at or past ``lengths[b]`` before it can reach an output.

Host side, ``PageAllocator`` owns the page table: it admits sequences (with a reservation, so
an admitted sequence can always finish), grows them page by page and frees them. It never hands
one page to two sequences, and a request it cannot satisfy changes nothing and returns
None/False. Writes (``write``/``append``) are pure JAX: tokens whose page is not assigned are
dropped, so an unchecked write can lose its own tokens but never touch another sequence's pages.

A serving step, per layer (``tests/test_paged.py::test_greedy_decode_token_for_token``)::

    alloc = PageAllocator(num_pages, Bk, max_seqs, max_pages)
    row = alloc.admit(len(prompt), reserve_tokens=len(prompt) + max_new)  # None: wait
    cache = alloc.sync(cache)                       # page table to the device, fresh rows 0
    cache = write(cache, k, v, k_idx, positions, rows)   # chunked prefill, any chunk size
    ...
    alloc.grow(row, length + q)                     # before each decode / verify step
    cache = append(alloc.sync(cache), k, v, k_idx)  # the q new tokens
    out = msa_jax.paged_msa_decode(q_, q_idx, *cache, block_size=Bk, topk=k)
    alloc.free(row)                                 # finished: pages back to the pool
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PagedCache(NamedTuple):
  """One layer's paged cache (a pytree; see the module docstring for the layouts)."""
  k_pages: jax.Array  # [num_pages, Bk, G, D]
  v_pages: jax.Array  # [num_pages, Bk, G, Dv]
  index_pages: jax.Array | None  # [num_pages, Bk, Di], None without an index branch
  page_table: jax.Array  # int32 [B, max_pages], -1 = unassigned
  lengths: jax.Array  # int32 [B]

  @property
  def page_size(self) -> int:
    return self.k_pages.shape[1]

  @property
  def num_pages(self) -> int:
    return self.k_pages.shape[0]

  @property
  def max_pages(self) -> int:
    return self.page_table.shape[1]

  @property
  def batch(self) -> int:
    return self.page_table.shape[0]

  @property
  def max_len(self) -> int:
    """Most tokens one row can hold (its page-table width times the page size)."""
    return self.max_pages * self.page_size


def init(*, num_pages: int, page_size: int, batch: int, max_pages: int, kv_heads: int,
         head_dim: int, index_dim: int | None = None, v_head_dim: int | None = None,
         dtype=jnp.bfloat16, page_table=None) -> PagedCache:
  """An empty cache: zero pages, lengths 0, page table all -1 (or ``page_table``)."""
  for name, value in (("num_pages", num_pages), ("page_size", page_size), ("batch", batch),
                      ("max_pages", max_pages), ("kv_heads", kv_heads),
                      ("head_dim", head_dim)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
  v_head_dim = head_dim if v_head_dim is None else v_head_dim
  if page_table is None:
    page_table = jnp.full((batch, max_pages), -1, jnp.int32)
  elif tuple(np.shape(page_table)) != (batch, max_pages):
    raise ValueError(f"page_table must have shape [batch={batch}, max_pages={max_pages}]; "
                     f"got {tuple(np.shape(page_table))}")
  return PagedCache(
      k_pages=jnp.zeros((num_pages, page_size, kv_heads, head_dim), dtype),
      v_pages=jnp.zeros((num_pages, page_size, kv_heads, v_head_dim), dtype),
      index_pages=(None if index_dim is None
                   else jnp.zeros((num_pages, page_size, index_dim), dtype)),
      page_table=jnp.asarray(page_table, jnp.int32),
      lengths=jnp.zeros((batch,), jnp.int32))


# ----------------------------------------------------------------------------- device writes


def token_slots(page_table: jax.Array, positions: jax.Array, rows: jax.Array, num_pages: int,
                page_size: int):
  """(page, slot) of each token; page = ``num_pages`` (out of range: dropped) for padding
  positions (-1), positions past the row's page table, and unassigned pages."""
  max_pages = page_table.shape[1]
  logical = jnp.where(positions >= 0, positions // page_size, max_pages)
  in_table = logical < max_pages
  page = page_table[rows[:, None], jnp.where(in_table, logical, 0)]
  ok = in_table & (page >= 0) & (page < num_pages)
  return jnp.where(ok, page, num_pages), jnp.where(positions >= 0, positions % page_size, 0)


def write(cache: PagedCache, k, v, k_idx, positions, rows=None) -> PagedCache:
  """Write new tokens into their pages (chunked prefill or decode); jittable.

  Args:
    cache: the layer's ``PagedCache``.
    k: [N, T, G, D], v: [N, T, G, Dv] keys and values of T new tokens of N sequences;
      k_idx: [N, T, Di] their index keys (None when the cache has no index pages).
    positions: int [N, T] absolute token positions; -1 = padding (not written).
    rows: int [N] page-table rows of the N sequences (default: 0..N-1, N = batch).

  Returns the cache with the tokens written and ``lengths[row]`` raised to
  ``max(position) + 1`` over the row's written tokens. Tokens whose page is unassigned (or past
  the table) are dropped, never written elsewhere: grow the allocation first.
  """
  n, t = positions.shape
  if rows is None:
    if n != cache.batch:
      raise ValueError(f"without rows, positions must cover the whole batch: expected "
                       f"[{cache.batch}, T], got {positions.shape}")
    rows = jnp.arange(n, dtype=jnp.int32)
  rows = jnp.asarray(rows, jnp.int32)
  if rows.shape != (n,):
    raise ValueError(f"rows must have shape [{n}] (one page-table row per sequence of "
                     f"positions); got {rows.shape}")
  g, d = cache.k_pages.shape[2:]
  if k.shape != (n, t, g, d):
    raise ValueError(f"k must have shape [{n}, {t}, {g}, {d}]; got {k.shape}")
  if v.shape != (n, t, g, cache.v_pages.shape[3]):
    raise ValueError(f"v must have shape [{n}, {t}, {g}, {cache.v_pages.shape[3]}]; "
                     f"got {v.shape}")
  if (k_idx is None) != (cache.index_pages is None):
    raise ValueError("k_idx must be given exactly when the cache has index pages")
  if k_idx is not None and k_idx.shape != (n, t, cache.index_pages.shape[2]):
    raise ValueError(f"k_idx must have shape [{n}, {t}, {cache.index_pages.shape[2]}]; "
                     f"got {k_idx.shape}")
  positions = jnp.asarray(positions, jnp.int32)
  page, slot = token_slots(cache.page_table, positions, rows, cache.num_pages, cache.page_size)
  put = lambda pages, new: pages.at[page, slot].set(new.astype(pages.dtype), mode="drop")
  written = page < cache.num_pages
  new_len = jnp.max(jnp.where(written, positions + 1, 0), axis=1)
  lengths = cache.lengths.at[rows].max(new_len)
  return cache._replace(
      k_pages=put(cache.k_pages, k), v_pages=put(cache.v_pages, v),
      index_pages=None if k_idx is None else put(cache.index_pages, k_idx),
      lengths=lengths)


def append_positions(lengths, q_len: int, num_new=None):
  """Positions [N, T] of T new tokens after ``lengths [N]``; -1 past ``num_new[n]``."""
  t = jnp.arange(q_len, dtype=jnp.int32)[None, :]
  pos = lengths[:, None] + t
  return pos if num_new is None else jnp.where(t < num_new[:, None], pos, -1)


def append(cache: PagedCache, k, v, k_idx, num_new=None, rows=None) -> PagedCache:
  """Append T new tokens per sequence after its cached ones (``num_new [N]`` for ragged
  counts); see ``write``."""
  n, t = k.shape[:2]
  rows_arr = jnp.arange(n, dtype=jnp.int32) if rows is None else jnp.asarray(rows, jnp.int32)
  positions = append_positions(cache.lengths[rows_arr], t, num_new)
  return write(cache, k, v, k_idx, positions, rows)


def gather(cache: PagedCache, pages=None):
  """Contiguous per-row copies ``[B, max_pages * Bk, ...]`` of ``pages`` (default: the cache's
  k, v and index pages, as a tuple); tokens at or past ``lengths[b]`` read as 0.

  The reference (``implementation="xla"``) path of the paged API, and a way to run chunked
  prefill through the contiguous ``msa_jax`` API.
  """
  if pages is None:
    return tuple(None if p is None else gather(cache, p)
                 for p in (cache.k_pages, cache.v_pages, cache.index_pages))
  return gather_pages(pages, cache.page_table, cache.lengths)


def gather_pages(pages, page_table, lengths):
  """pages [P, Bk, ...] -> [B, max_pages * Bk, ...] in token order, zero past ``lengths``."""
  b, max_pages = page_table.shape
  bk = pages.shape[1]
  ids = jnp.clip(page_table, 0, pages.shape[0] - 1)
  x = pages[ids]  # [B, max_pages, Bk, ...]
  x = x.reshape(b, max_pages * bk, *pages.shape[2:])
  live = jnp.arange(max_pages * bk)[None, :] < lengths[:, None]
  live = live.reshape(*live.shape, *([1] * (x.ndim - 2)))
  return jnp.where(live, x, jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------- host allocator


class PageAllocator:
  """Host-side page bookkeeping for up to ``max_seqs`` sequences (page-table rows).

  ``admit`` takes a free row and the pages for a prompt, and can reserve pages for the tokens
  the sequence will still generate, so that ``grow`` within the reservation always succeeds;
  ``grow`` assigns more pages (reserved first, then free ones); ``free`` returns all of a row's
  pages. A request that cannot be met returns None/False and changes nothing; misuse (unknown
  row, more tokens than a row can hold) raises ``ValueError``. ``sync`` copies the page table
  to a ``PagedCache`` and zeroes the lengths of rows freed or newly admitted since the last
  sync.
  """

  def __init__(self, num_pages: int, page_size: int, max_seqs: int, max_pages_per_seq: int):
    for name, value in (("num_pages", num_pages), ("page_size", page_size),
                        ("max_seqs", max_seqs), ("max_pages_per_seq", max_pages_per_seq)):
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    self.num_pages = int(num_pages)
    self.page_size = int(page_size)
    self.max_seqs = int(max_seqs)
    self.max_pages_per_seq = int(max_pages_per_seq)
    self.page_table = np.full((max_seqs, max_pages_per_seq), -1, np.int32)
    self._free_pages = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
    self._num_assigned = np.zeros(max_seqs, np.int64)
    self._reserved = np.zeros(max_seqs, np.int64)  # reserved, not yet assigned
    self._live = np.zeros(max_seqs, bool)
    self._reset = np.zeros(max_seqs, bool)  # length must read 0 at the next sync

  # -- queries
  @property
  def num_free_pages(self) -> int:
    """Pages neither assigned nor reserved: what a new request can still get."""
    return len(self._free_pages) - int(self._reserved.sum())

  def live_rows(self) -> list[int]:
    return [int(r) for r in np.flatnonzero(self._live)]

  def capacity(self, row: int) -> int:
    """Tokens row ``row`` can hold with its assigned pages."""
    self._check_live(row)
    return int(self._num_assigned[row]) * self.page_size

  def pages_for(self, num_tokens: int) -> int:
    return -(-int(num_tokens) // self.page_size)

  # -- operations
  def admit(self, num_tokens: int, reserve_tokens: int | None = None) -> int | None:
    """Admit a sequence: a free row with pages for ``num_tokens`` tokens assigned and pages for
    ``reserve_tokens`` (>= num_tokens; default num_tokens) kept for it. Returns the row, or
    None (nothing changed) when no row or not enough pages are free."""
    num_tokens = self._check_tokens("num_tokens", num_tokens)
    reserve_tokens = num_tokens if reserve_tokens is None else self._check_tokens(
        "reserve_tokens", reserve_tokens)
    if reserve_tokens < num_tokens:
      raise ValueError(f"reserve_tokens ({reserve_tokens}) must be >= num_tokens "
                       f"({num_tokens})")
    need = self.pages_for(reserve_tokens)
    free_rows = np.flatnonzero(~self._live)
    if not len(free_rows) or need > self.num_free_pages:
      return None
    row = int(free_rows[0])
    self._live[row] = True
    self._reset[row] = True
    self._reserved[row] = need
    self._assign(row, self.pages_for(num_tokens))
    return row

  def grow(self, row: int, num_tokens: int) -> bool:
    """Make row ``row`` hold at least ``num_tokens`` tokens. False (nothing changed) when the
    free pages (plus the row's own reservation) do not suffice."""
    self._check_live(row)
    num_tokens = self._check_tokens("num_tokens", num_tokens)
    extra = self.pages_for(num_tokens) - int(self._num_assigned[row])
    if extra <= 0:
      return True
    if extra > int(self._reserved[row]) + self.num_free_pages:
      return False
    self._assign(row, extra)
    return True

  def free(self, row: int) -> None:
    """Release a sequence: its pages (and reservation) go back to the pool."""
    self._check_live(row)
    n = int(self._num_assigned[row])
    # Returned in reverse so that the next request reuses them lowest-first.
    self._free_pages.extend(int(p) for p in self.page_table[row, :n][::-1])
    self.page_table[row] = -1
    self._num_assigned[row] = 0
    self._reserved[row] = 0
    self._live[row] = False
    self._reset[row] = True

  def table(self) -> jax.Array:
    return jnp.asarray(self.page_table)

  def sync(self, cache: PagedCache) -> PagedCache:
    """``cache`` with this page table; rows freed or admitted since the last sync get
    length 0."""
    if cache.page_table.shape != self.page_table.shape:
      raise ValueError(f"cache page_table has shape {cache.page_table.shape}, the allocator "
                       f"{self.page_table.shape}")
    if cache.num_pages != self.num_pages or cache.page_size != self.page_size:
      raise ValueError(f"cache has {cache.num_pages} pages of {cache.page_size} tokens, the "
                       f"allocator {self.num_pages} of {self.page_size}")
    lengths = jnp.where(jnp.asarray(self._reset), 0, cache.lengths).astype(jnp.int32)
    self._reset[:] = False
    return cache._replace(page_table=self.table(), lengths=lengths)

  # -- internals
  def _assign(self, row: int, count: int):
    start = int(self._num_assigned[row])
    for i in range(count):
      self.page_table[row, start + i] = self._free_pages.pop()
    self._num_assigned[row] = start + count
    self._reserved[row] = max(0, int(self._reserved[row]) - count)

  def _check_live(self, row):
    if not isinstance(row, (int, np.integer)) or not 0 <= row < self.max_seqs \
        or not self._live[row]:
      raise ValueError(f"row must be an admitted sequence's row (one of {self.live_rows()}); "
                       f"got {row!r}")

  def _check_tokens(self, name, n):
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
      raise ValueError(f"{name} must be an integer >= 0; got {n!r}")
    limit = self.max_pages_per_seq * self.page_size
    if n > limit:
      raise ValueError(f"{name} = {n} exceeds what one sequence can hold: max_pages_per_seq "
                       f"({self.max_pages_per_seq}) x page_size ({self.page_size}) = {limit}")
    return int(n)
