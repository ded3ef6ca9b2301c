"""Paged caches (msa_jax.paged) and the ops over pages (page_table=) against the contiguous path.

Pages are handed out out of order, lengths are ragged and not multiples of Bk, and every page
(or page slot) that holds no live token is poisoned (NaN keys/values, huge index keys), so a
kernel that reads past a sequence's length or through a stale page-table entry fails here.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import msa_jax
from msa_jax import paged
from msa_jax import reference
from msa_jax import schedule as sched
from msa_jax.ops.index_topk import gpu_triton_paged as gpu_paged_index
from msa_jax import tuning
from tests import cases as C
from tests import oracle

KERNELS = ["pallas_gpu", "pallas_tpu"]
DTYPES = [jnp.float32, jnp.bfloat16]
HUGE = 1e30  # a stale index key this large would win every selection it leaked into


# ----------------------------------------------------------------------------- allocator


def _check_invariants(alloc: paged.PageAllocator):
  """No page in two rows or in a row and the free list; every page accounted for."""
  table = alloc.page_table
  assigned = table[table >= 0]
  assert len(set(assigned.tolist())) == len(assigned)
  free = set(alloc._free_pages)
  assert not free & set(assigned.tolist())
  assert len(free) + len(assigned) == alloc.num_pages
  assert alloc.num_free_pages >= 0
  for row in range(alloc.max_seqs):  # assigned pages form a prefix of the row
    n = int((table[row] >= 0).sum())
    assert np.all(table[row, :n] >= 0) and np.all(table[row, n:] == -1)


def test_allocator_admit_grow_free():
  alloc = paged.PageAllocator(num_pages=10, page_size=4, max_seqs=3, max_pages_per_seq=4)
  a = alloc.admit(5)  # 2 pages
  assert a == 0 and alloc.capacity(a) == 8 and alloc.num_free_pages == 8
  b = alloc.admit(3, reserve_tokens=16)  # 1 page assigned, 4 held
  assert b == 1 and alloc.capacity(b) == 4 and alloc.num_free_pages == 4
  assert alloc.grow(b, 16) and alloc.capacity(b) == 16 and alloc.num_free_pages == 4
  assert alloc.grow(a, 8)  # already there: nothing to do
  _check_invariants(alloc)
  # Out of pages: None / False and nothing changes.
  assert alloc.grow(a, 16) and alloc.num_free_pages == 2
  before = alloc.page_table.copy()
  assert alloc.admit(12) is None  # 3 pages, 2 free
  assert alloc.admit(4, reserve_tokens=12) is None  # the reservation counts too
  np.testing.assert_array_equal(alloc.page_table, before)
  assert alloc.num_free_pages == 2
  c = alloc.admit(4)
  assert c == 2 and alloc.num_free_pages == 1
  before = alloc.page_table.copy()
  assert alloc.admit(1) is None  # no free row
  assert not alloc.grow(c, 16)  # 3 more pages, 1 free
  np.testing.assert_array_equal(alloc.page_table, before)
  assert alloc.num_free_pages == 1
  _check_invariants(alloc)
  # Free returns the pages; a new sequence reuses them.
  pages_a = set(alloc.page_table[a][alloc.page_table[a] >= 0].tolist())
  alloc.free(a)
  assert alloc.num_free_pages == 5 and np.all(alloc.page_table[a] == -1)
  d = alloc.admit(13)
  assert d == a and set(alloc.page_table[d][:4].tolist()) == pages_a
  _check_invariants(alloc)
  assert alloc.live_rows() == [0, 1, 2]


def test_allocator_errors():
  alloc = paged.PageAllocator(num_pages=8, page_size=4, max_seqs=2, max_pages_per_seq=3)
  with pytest.raises(ValueError, match="exceeds what one sequence can hold"):
    alloc.admit(13)
  with pytest.raises(ValueError, match="reserve_tokens .* must be >= num_tokens"):
    alloc.admit(8, reserve_tokens=4)
  with pytest.raises(ValueError, match="admitted sequence's row"):
    alloc.grow(0, 4)
  row = alloc.admit(4)
  with pytest.raises(ValueError, match="exceeds what one sequence can hold"):
    alloc.grow(row, 20)
  alloc.free(row)
  with pytest.raises(ValueError, match="admitted sequence's row"):
    alloc.free(row)
  with pytest.raises(ValueError, match="num_pages must be an integer"):
    paged.PageAllocator(num_pages=0, page_size=4, max_seqs=1, max_pages_per_seq=1)


def test_allocator_random_operations_keep_invariants():
  rng = np.random.default_rng(0)
  alloc = paged.PageAllocator(num_pages=20, page_size=4, max_seqs=5, max_pages_per_seq=6)
  for _ in range(300):
    live = alloc.live_rows()
    op = rng.integers(3)
    if op == 0:
      n = int(rng.integers(0, 25))
      free_before = alloc.num_free_pages
      row = alloc.admit(n, reserve_tokens=int(rng.integers(n, 25)))
      if row is None:
        assert alloc.num_free_pages == free_before
    elif op == 1 and live:
      row = int(rng.choice(live))
      before = alloc.page_table.copy()
      if not alloc.grow(row, int(rng.integers(0, 25))):
        np.testing.assert_array_equal(alloc.page_table, before)
    elif live:
      alloc.free(int(rng.choice(live)))
    _check_invariants(alloc)


def test_allocator_sync_resets_lengths_of_new_rows():
  alloc = paged.PageAllocator(num_pages=6, page_size=4, max_seqs=2, max_pages_per_seq=3)
  cache = paged.init(num_pages=6, page_size=4, batch=2, max_pages=3, kv_heads=1, head_dim=2,
                     index_dim=2, dtype=jnp.float32)
  r0, r1 = alloc.admit(5), alloc.admit(4)
  assert {r0, r1} == {0, 1}
  cache = alloc.sync(cache._replace(lengths=jnp.array([7, 7], jnp.int32)))
  np.testing.assert_array_equal(cache.lengths, [0, 0])
  np.testing.assert_array_equal(cache.page_table, alloc.page_table)
  cache = alloc.sync(cache._replace(lengths=jnp.array([5, 4], jnp.int32)))
  np.testing.assert_array_equal(cache.lengths, [5, 4])  # live rows keep their lengths
  alloc.free(r0)
  assert alloc.admit(2) == r0  # freed and re-admitted between syncs: still a new sequence
  cache = alloc.sync(cache)
  np.testing.assert_array_equal(cache.lengths, [0, 4])


# ----------------------------------------------------------------------------- writes


def test_chunked_prefill_and_decode_writes_match_contiguous():
  rng = np.random.default_rng(1)
  bk, g, d, di, maxp = 4, 2, 3, 5, 5
  alloc = paged.PageAllocator(num_pages=16, page_size=bk, max_seqs=3, max_pages_per_seq=maxp)
  junk = alloc.admit(9)  # fragment the pool so pages come out of order
  rows = [alloc.admit(10, reserve_tokens=20), alloc.admit(3, reserve_tokens=20)]
  alloc.free(junk)
  rows.append(alloc.admit(7, reserve_tokens=20))
  cache = paged.init(num_pages=16, page_size=bk, batch=3, max_pages=maxp, kv_heads=g,
                     head_dim=d, index_dim=di, dtype=jnp.float32)
  cache = cache._replace(k_pages=jnp.full_like(cache.k_pages, jnp.nan))
  cache = alloc.sync(cache)
  s = maxp * bk
  k, v = rng.standard_normal((2, 3, s, g, d)).astype(np.float32)
  ki = rng.standard_normal((3, s, di)).astype(np.float32)
  lengths = np.array([10, 3, 7])
  # Chunked prefill: chunks of 4, ragged (rows with fewer tokens pad with -1).
  write = jax.jit(paged.write)
  for start in range(0, 10, 4):
    pos = np.arange(start, start + 4)[None, :].repeat(3, 0)
    pos = np.where(pos < lengths[:, None], pos, -1).astype(np.int32)
    take = lambda x: np.take_along_axis(x, np.maximum(pos, 0).reshape(
        3, 4, *([1] * (x.ndim - 2))), axis=1)
    cache = write(cache, take(k), take(v), take(ki), pos, jnp.asarray(rows))
  assert rows == [1, 2, 0]
  np.testing.assert_array_equal(cache.lengths[jnp.asarray(rows)], lengths)
  # Decode: append to sequences 0 and 2 only (``rows``), a ragged count via num_new.
  for seq in (0, 2):
    assert alloc.grow(rows[seq], int(lengths[seq]) + 2)
  cache = alloc.sync(cache)
  sel = lambda x: jnp.stack([x[0, 10:12], x[2, 7:9]])
  cache = paged.append(cache, sel(k), sel(v), sel(ki), num_new=jnp.array([2, 1]),
                       rows=jnp.array([rows[0], rows[2]]))
  lengths = np.array([12, 3, 8])
  np.testing.assert_array_equal(cache.lengths[jnp.asarray(rows)], lengths)
  gk, gv, gki = (x[jnp.asarray(rows)] for x in paged.gather(cache))
  for b in range(3):
    n = lengths[b]
    np.testing.assert_array_equal(gk[b, :n], k[b, :n])
    np.testing.assert_array_equal(gv[b, :n], v[b, :n])
    np.testing.assert_array_equal(gki[b, :n], ki[b, :n])
    assert np.all(np.asarray(gk[b, n:]) == 0)  # past the length: 0, not the NaN pages


def test_write_past_allocation_never_touches_other_pages():
  cache = paged.init(num_pages=6, page_size=2, batch=2, max_pages=3, kv_heads=1, head_dim=1,
                     index_dim=1, dtype=jnp.float32,
                     page_table=jnp.array([[4, -1, -1], [1, 0, 5]], jnp.int32))
  ones = jnp.ones((1, 6, 1, 1))
  # Row 0 has one page: tokens 2..5 have nowhere to go and are dropped.
  cache = paged.write(cache, ones, ones, ones[..., 0], jnp.arange(6)[None], rows=jnp.array([0]))
  k = np.asarray(cache.k_pages)[..., 0, 0]
  np.testing.assert_array_equal(k[4], [1, 1])
  np.testing.assert_array_equal(np.delete(k, 4, axis=0), 0)
  np.testing.assert_array_equal(cache.lengths, [2, 0])


def test_write_validation():
  cache = paged.init(num_pages=4, page_size=2, batch=2, max_pages=2, kv_heads=1, head_dim=3,
                     dtype=jnp.float32)
  x = jnp.zeros((2, 1, 1, 3))
  pos = jnp.zeros((2, 1), jnp.int32)
  with pytest.raises(ValueError, match=r"k must have shape \[2, 1, 1, 3\]"):
    paged.write(cache, x[..., :2], x, None, pos)
  with pytest.raises(ValueError, match="k_idx must be given exactly when"):
    paged.write(cache, x, x, jnp.zeros((2, 1, 4)), pos)
  with pytest.raises(ValueError, match="rows must have shape"):
    paged.write(cache, x, x, None, pos, rows=jnp.array([0]))
  with pytest.raises(ValueError, match="page_size must be an integer >= 1"):
    paged.init(num_pages=4, page_size=0, batch=1, max_pages=1, kv_heads=1, head_dim=1)


# ----------------------------------------------------------------------------- paged test data


def make_paged(*, batch, q_len, lengths, q_heads, groups, dtype, block_size=16, topk=3,
               head_dim=32, index_dim=16, max_pages=8, num_pages=40, seed=0):
  """Random contiguous inputs and the same tokens in shuffled, poisoned pages.

  Pages are a random permutation of the pool; unused pages and the stale tail slots of each
  sequence's last page hold NaN keys/values and huge index keys; page-table entries past a
  sequence's pages point at other sequences' pages (row 0) or are -1 (other rows).
  """
  rng = np.random.default_rng(seed)
  s = max_pages * block_size
  lengths = np.asarray(lengths, np.int32)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  k, v = normal(batch, s, groups, head_dim), normal(batch, s, groups, head_dim)
  k_idx = normal(batch, s, index_dim)
  perm = rng.permutation(num_pages)
  table = np.full((batch, max_pages), -1, np.int32)
  used = 0
  for b in range(batch):
    n = -(-int(lengths[b]) // block_size)
    table[b, :n] = perm[used:used + n]
    used += n
  n0 = -(-int(lengths[0]) // block_size)
  table[0, n0:] = rng.choice(perm[:used], max_pages - n0)  # stale entries, live pages
  cache = paged.PagedCache(
      k_pages=jnp.full((num_pages, block_size, groups, head_dim), jnp.nan, dtype),
      v_pages=jnp.full((num_pages, block_size, groups, head_dim), jnp.nan, dtype),
      index_pages=jnp.full((num_pages, block_size, index_dim), HUGE, dtype),
      page_table=jnp.asarray(np.where(np.arange(max_pages) < -(-lengths[:, None] // block_size),
                                      table, -1)),
      lengths=jnp.zeros((batch,), jnp.int32))
  pos = np.where(np.arange(s)[None] < lengths[:, None], np.arange(s)[None], -1).astype(np.int32)
  cast = lambda x: jnp.asarray(x, dtype)
  cache = paged.write(cache, cast(k), cast(v), cast(k_idx), jnp.asarray(pos))
  cache = cache._replace(page_table=jnp.asarray(table))
  return dict(
      q=cast(normal(batch, q_len, q_heads, head_dim)),
      q_idx=cast(normal(batch, q_len, groups, index_dim)),
      k=cast(k), v=cast(v), k_idx=cast(k_idx), cache=cache, lengths=jnp.asarray(lengths),
      q_positions=reference.default_q_positions(q_len, jnp.asarray(lengths)),
      block_size=block_size, topk=topk, groups=groups)


PAGED_CASES = {
    # One token per sequence, GQA 16 (no row padding on GPU); lengths not multiples of Bk, a
    # sequence of one page exactly, an empty row (idle slot: padding query).
    "q1": dict(batch=4, q_len=1, lengths=(75, 16, 33, 0), q_heads=16, groups=1),
    # Speculative verification, 8 tokens, GQA 2; a sequence shorter than q (padding queries).
    "q8": dict(batch=3, q_len=8, lengths=(100, 5, 40), q_heads=4, groups=2),
}


def _contiguous_ids(x):
  return msa_jax.index_topk(x["q_idx"], x["k_idx"], block_size=x["block_size"], topk=x["topk"],
                            kv_lengths=x["lengths"], implementation="xla")


def _contiguous_attention(x, ids):
  return msa_jax.sparse_attention(x["q"], x["k"], x["v"], ids, block_size=x["block_size"],
                                  kv_lengths=x["lengths"], return_lse=True,
                                  implementation="xla")


def _random_selection(x, seed):
  case = C.Case("paged", batch=x["q"].shape[0], q_len=x["q"].shape[1],
                kv_len=x["k"].shape[1], q_heads=x["q"].shape[2], groups=x["groups"],
                block_size=x["block_size"], topk=x["topk"] + 1)
  return C.random_selection(case, dict(q_positions=x["q_positions"], kv_lengths=x["lengths"]),
                            seed=seed, holes=True)


def _assert_close(out, lse, ref_out, ref_lse, dtype):
  out32 = np.asarray(out, np.float32)
  assert out.dtype == dtype and np.all(np.isfinite(out32))
  assert C.rel_err(out, ref_out) <= (1e-5 if dtype == jnp.float32 else 1e-2)
  fin = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(ref_lse)[fin],
                             atol=1e-4 if dtype == jnp.float32 else 1e-2)
  assert np.all(out32[~fin] == 0)


# ----------------------------------------------------------------------------- paged == contiguous


@pytest.mark.parametrize("name", list(PAGED_CASES))
def test_reference_paged_equals_contiguous(name):
  """The ``"xla"`` paged path (gather pages, then the contiguous reference) is the contiguous
  path on the same tokens, bit for bit, whatever the page order and poison."""
  x = make_paged(**PAGED_CASES[name], dtype=jnp.float32, seed=2)
  out, ids, lse = msa_jax.paged_msa_decode(x["q"], x["q_idx"], *x["cache"],
                                           block_size=x["block_size"], topk=x["topk"],
                                           return_indices=True, return_lse=True,
                                           implementation="xla")
  want_ids = _contiguous_ids(x)
  assert oracle.same_sets(ids, want_ids)
  pos, lengths = np.asarray(x["q_positions"]), np.asarray(x["lengths"])
  f64 = lambda a: np.asarray(a, np.float64)
  assert oracle.same_sets(ids, oracle.index_topk(f64(x["q_idx"]), f64(x["k_idx"]),
                                                 x["block_size"], x["topk"], pos, lengths))
  ref_out, ref_lse = _contiguous_attention(x, want_ids)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(ref_lse))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(PAGED_CASES))
@pytest.mark.parametrize("impl", KERNELS)
def test_paged_kernels_match_reference(impl, name, dtype):
  """Interpret-mode kernels: selection sets equal to the contiguous reference, outputs within
  tolerance on a selection with holes and repeats; nothing of the poisoned pages leaks."""
  x = make_paged(**PAGED_CASES[name], dtype=dtype, seed=3)
  ids = msa_jax.paged_index_topk(x["q_idx"], x["cache"].index_pages, x["cache"].page_table,
                                 x["lengths"], block_size=x["block_size"], topk=x["topk"],
                                 implementation=impl, interpret=True)
  assert ids.shape == (*x["q"].shape[:2], x["groups"], x["topk"]) and ids.dtype == jnp.int32
  assert oracle.same_sets(ids, _contiguous_ids(x))
  sel = _random_selection(x, seed=3)
  cache = x["cache"]
  out, lse = msa_jax.paged_sparse_decode(x["q"], cache.k_pages, cache.v_pages,
                                         cache.page_table, cache.lengths, sel,
                                         block_size=x["block_size"], return_lse=True,
                                         implementation=impl, interpret=True)
  _assert_close(out, lse, *_contiguous_attention(x, sel), dtype)


@pytest.mark.parametrize("selection", ["tile", "fused"])
def test_gpu_paged_selection_in_kernel(selection):
  """Top-k inside the GPU scoring kernel: per page tile, and a running top-k over all tiles."""
  x = make_paged(**PAGED_CASES["q8"], dtype=jnp.float32, seed=4)
  with tuning.override(gpu_paged_index.CONFIG, selection=selection, blocks_per_tile=2):
    ids = msa_jax.paged_index_topk(x["q_idx"], x["cache"].index_pages, x["cache"].page_table,
                                   x["lengths"], block_size=x["block_size"], topk=x["topk"],
                                   implementation="pallas_gpu", interpret=True)
  assert oracle.same_sets(ids, _contiguous_ids(x))


@pytest.mark.parametrize("impl,num_splits", [("pallas_gpu", 1), ("pallas_gpu", 4),
                                             ("pallas_tpu", 2)])
def test_paged_decode_split_k(impl, num_splits):
  """Any split of the selected pages merges (LSE combine) to the reference; the TPU kernel
  under the Mosaic-TPU interpreter (DMA/semaphore checks, races, NaN-filled scratch)."""
  module = importlib.import_module(
      "msa_jax.ops.sparse_attention." + {"pallas_gpu": "gpu_triton_paged",
                                        "pallas_tpu": "tpu_paged"}[impl])
  x = make_paged(**PAGED_CASES["q8"], dtype=jnp.float32, seed=5)
  sel = _random_selection(x, seed=5)
  cache = x["cache"]
  interpret = (pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
               if impl == "pallas_tpu" else True)
  # The TPU kernel takes the selection compacted; the GPU one compacts it in the kernel.
  selection = (sched.compact_selection(sel, cache.max_pages) if impl == "pallas_tpu"
               else (sel,))
  p_out, p_lse = module.paged_sparse_decode_partials(
      x["q"], cache.k_pages, cache.v_pages, cache.page_table, *selection, x["q_positions"],
      cache.lengths, block_size=x["block_size"], scale=1 / np.sqrt(x["q"].shape[-1]),
      num_splits=num_splits, interpret=interpret)
  assert p_out.shape[0] == num_splits
  out, lse = sched.combine(p_out, p_lse, jnp.ones((*sel.shape[:3], num_splits), bool),
                           jnp.float32)
  _assert_close(out, lse, *_contiguous_attention(x, sel), jnp.float32)
  if impl == "pallas_tpu":
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    assert ipc.races is not None and not ipc.races.races_found


def test_tpu_paged_index_under_tpu_interpreter():
  x = make_paged(**PAGED_CASES["q1"], dtype=jnp.float32, seed=6)
  params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
  ids = msa_jax.paged_index_topk(x["q_idx"], x["cache"].index_pages, x["cache"].page_table,
                                 x["lengths"], block_size=x["block_size"], topk=x["topk"],
                                 implementation="pallas_tpu", interpret=params)
  assert oracle.same_sets(ids, _contiguous_ids(x))


# ----------------------------------------------------------------------------- token for token


class ToyModel:
  """One MSA layer between an embedding and its transpose: enough to make greedy decoding
  depend on every attention output."""

  def __init__(self, vocab=48, width=32, q_heads=4, groups=2, head_dim=16, index_dim=8,
               seed=7):
    r = np.random.default_rng(seed)
    w = lambda *s: jnp.asarray(r.standard_normal(s) / np.sqrt(s[0]), jnp.float32)
    self.embed = jnp.asarray(r.standard_normal((vocab, width)), jnp.float32)
    self.pos_embed = jnp.asarray(0.5 * r.standard_normal((256, width)), jnp.float32)
    self.wq, self.wk, self.wv = (w(width, n) for n in (q_heads * head_dim,
                                                       groups * head_dim, groups * head_dim))
    self.wqi, self.wki = w(width, groups * index_dim), w(width, index_dim)
    self.wo = w(q_heads * head_dim, width)
    self.dims = (q_heads, groups, head_dim, index_dim)

  def project(self, tokens, positions):
    hq, g, d, di = self.dims
    x = self.embed[tokens] + self.pos_embed[jnp.maximum(positions, 0)]
    b, t = tokens.shape
    return ((x @ self.wq).reshape(b, t, hq, d), (x @ self.wk).reshape(b, t, g, d),
            (x @ self.wv).reshape(b, t, g, d), (x @ self.wqi).reshape(b, t, g, di),
            x @ self.wki)

  def logits(self, out):
    b, t = out.shape[:2]
    return (out.reshape(b, t, -1) @ self.wo) @ self.embed.T


def _contiguous_put(buf, new, positions):
  rows = jnp.broadcast_to(jnp.arange(buf.shape[0])[:, None], positions.shape)
  cols = jnp.where(positions >= 0, positions, buf.shape[1])
  return buf.at[rows, cols].set(new, mode="drop")


GREEDY = dict(block_size=8, topk=2, max_pages=8, prompt_lens=(37, 21), prompt_width=40,
              steps=(1, 1, 4, 1, 4))  # decode steps and speculative 4-token verification


def _prompt():
  rng = np.random.default_rng(8)
  lens = np.array(GREEDY["prompt_lens"])
  w = GREEDY["prompt_width"]
  pos = np.where(np.arange(w)[None] < lens[:, None], np.arange(w)[None], -1)
  return jnp.asarray(rng.integers(0, 48, (2, w)), jnp.int32), jnp.asarray(pos, jnp.int32)


def _drafts(tokens, n):
  """n tokens to verify: the last token, then deterministic guesses after it."""
  return tokens if n == 1 else (tokens[:, -1:] + jnp.arange(n)[None]) % 48


@functools.lru_cache(maxsize=None)
def _contiguous_greedy():
  """Tokens [B, n] of every step of the contiguous path (shared by the paged runs)."""
  model = ToyModel()
  bk, topk = GREEDY["block_size"], GREEDY["topk"]
  s = GREEDY["max_pages"] * bk
  msa = functools.partial(msa_jax.msa_attention, block_size=bk, topk=topk, implementation="xla")
  prompt, pos = _prompt()
  lens = jnp.asarray(GREEDY["prompt_lens"], jnp.int32)
  q, k, v, qi, ki = model.project(prompt, pos)
  kc = _contiguous_put(jnp.zeros((2, s, 2, 16)), k, pos)
  vc = _contiguous_put(jnp.zeros((2, s, 2, 16)), v, pos)
  kic = _contiguous_put(jnp.zeros((2, s, 8)), ki, pos)
  out = msa(q, kc, vc, qi, kic, q_positions=pos, kv_lengths=lens)
  tokens = jnp.argmax(model.logits(out), -1)[jnp.arange(2), lens - 1][:, None]

  @functools.partial(jax.jit, static_argnums=0)
  def step(n, tokens, kc, vc, kic, lengths):
    positions = lengths[:, None] + jnp.arange(n)[None]
    q, k, v, qi, ki = model.project(tokens, positions)
    kc, vc, kic = (_contiguous_put(a, b, positions) for a, b in ((kc, k), (vc, v), (kic, ki)))
    out = msa(q, kc, vc, qi, kic, kv_lengths=lengths + n)
    return jnp.argmax(model.logits(out), -1), kc, vc, kic

  history = [np.asarray(tokens)]
  for n in GREEDY["steps"]:
    tokens, kc, vc, kic = step(n, _drafts(tokens, n), kc, vc, kic, lens)
    lens = lens + n
    history.append(np.asarray(tokens))
    tokens = tokens[:, -1:]
  assert int(lens.max()) > topk * bk  # the sparse regime: not every block selected
  return history


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
def test_greedy_decode_token_for_token(impl):
  """Greedy decoding with a toy model: the paged path (allocator, chunked prefill through
  ``paged.write``, ``paged_msa_decode`` on a fragmented, poisoned page pool) produces the same
  tokens as the contiguous path (``msa_attention`` on [B, S] caches), step for step, through
  single-token steps and 4-token verification steps."""
  want = _contiguous_greedy()
  model = ToyModel()
  bk, topk, maxp = GREEDY["block_size"], GREEDY["topk"], GREEDY["max_pages"]
  prompt_lens = np.array(GREEDY["prompt_lens"])
  prompt, pos = _prompt()
  q, k, v, qi, ki = model.project(prompt, pos)

  alloc = paged.PageAllocator(num_pages=24, page_size=bk, max_seqs=3, max_pages_per_seq=maxp)
  junk = [alloc.admit(20), alloc.admit(9)]
  rows = [alloc.admit(int(prompt_lens[0]), reserve_tokens=60)]
  alloc.free(junk[0])
  rows.append(alloc.admit(int(prompt_lens[1]), reserve_tokens=60))
  alloc.free(junk[1])  # row 1 stays idle: length 0, padding queries in every step
  assert rows == [2, 0]
  cache = paged.init(num_pages=24, page_size=bk, batch=3, max_pages=maxp, kv_heads=2,
                     head_dim=16, index_dim=8, dtype=jnp.float32)
  cache = cache._replace(k_pages=jnp.full_like(cache.k_pages, jnp.nan),
                         v_pages=jnp.full_like(cache.v_pages, jnp.nan),
                         index_pages=jnp.full_like(cache.index_pages, HUGE))
  cache = alloc.sync(cache)
  row_ids = jnp.asarray(rows, jnp.int32)
  for start in range(0, GREEDY["prompt_width"], 16):  # chunked prefill
    chunk = slice(start, start + 16)
    cache = paged.write(cache, k[:, chunk], v[:, chunk], ki[:, chunk], pos[:, chunk],
                        rows=row_ids)
  np.testing.assert_array_equal(cache.lengths[row_ids], prompt_lens)
  gk, gv, gki = (x[row_ids] for x in paged.gather(cache))
  out = msa_jax.msa_attention(q, gk, gv, qi, gki, block_size=bk, topk=topk, q_positions=pos,
                              kv_lengths=cache.lengths[row_ids], implementation="xla")
  tokens = jnp.argmax(model.logits(out), -1)[jnp.arange(2), prompt_lens - 1][:, None]
  np.testing.assert_array_equal(tokens, want[0])

  @functools.partial(jax.jit, static_argnums=0)
  def step(n, tokens, cache, lengths):
    positions = lengths[:, None] + jnp.arange(n)[None]
    q, k, v, qi, ki = model.project(tokens, positions)
    full = lambda x: jnp.zeros((3, *x.shape[1:]), x.dtype).at[row_ids].set(x)
    cache = paged.append(cache, k, v, ki, rows=row_ids)
    out = msa_jax.paged_msa_decode(full(q), full(qi), *cache, block_size=bk, topk=topk,
                                   implementation=impl, interpret=impl != "xla")
    return jnp.argmax(model.logits(out[row_ids]), -1), cache

  lengths = jnp.asarray(prompt_lens, jnp.int32)
  for i, n in enumerate(GREEDY["steps"]):
    for r, length in zip(rows, np.asarray(lengths)):
      assert alloc.grow(r, int(length) + n)
    cache = alloc.sync(cache)
    tokens, cache = step(n, _drafts(tokens, n), cache, lengths)
    np.testing.assert_array_equal(tokens, want[i + 1])
    lengths = lengths + n
    tokens = tokens[:, -1:]
  np.testing.assert_array_equal(cache.lengths, [lengths[1], 0, lengths[0]])


# ----------------------------------------------------------------------------- validation


def _validation_inputs():
  x = make_paged(**PAGED_CASES["q1"], dtype=jnp.float32, seed=9)
  c = x["cache"]
  return dict(q=x["q"], q_idx=x["q_idx"], k_pages=c.k_pages, v_pages=c.v_pages,
              index_pages=c.index_pages, page_table=c.page_table, lengths=c.lengths)


V = _validation_inputs()
VALIDATION_CASES = {
    "page size": (dict(block_size=8), r"page size of k_pages .* must equal block_size \(8\)"),
    "table rank": (dict(page_table=V["page_table"][0]), "page_table must be a rank-2"),
    "table dtype": (dict(page_table=V["page_table"].astype(jnp.float32)),
                    "page_table must be an integer"),
    "table batch": (dict(page_table=V["page_table"][:2]), "page_table must have shape"),
    "table unassigned": (dict(page_table=V["page_table"].at[0, 1].set(-1)),
                         r"page_table\[0, 1\] = -1 with lengths\[0\] = 75"),
    "table range": (dict(page_table=V["page_table"].at[2, 0].set(40)),
                    r"page id in \[0, 40\)"),
    "lengths long": (dict(lengths=jnp.array([129, 1, 1, 1], jnp.int32)),
                     r"lengths must lie in \[0, max_pages \* block_size = 128\]"),
    "lengths shape": (dict(lengths=V["lengths"][:3]), r"lengths must have shape \[4\]"),
    "lengths dtype": (dict(lengths=V["lengths"].astype(jnp.float32)),
                      "lengths must be an integer"),
    "q_idx groups": (dict(q_idx=jnp.zeros((4, 1, 2, 16))), "one index head per KV group"),
    "q_idx dim": (dict(q_idx=jnp.zeros((4, 1, 1, 8))), "index_pages must have index_dim 8"),
    "q_idx length": (dict(q_idx=jnp.zeros((4, 2, 1, 16))), r"q_idx must have \[batch, q_len\]"),
    "index dtype": (dict(q_idx=V["q_idx"].astype(jnp.bfloat16)), "q_idx and index_pages"),
    "kv dtype": (dict(v_pages=V["v_pages"].astype(jnp.bfloat16)), "share one dtype"),
    "heads": (dict(k_pages=jnp.zeros((40, 16, 3, 32)), v_pages=jnp.zeros((40, 16, 3, 32))),
              r"q_heads \(16\) must be a multiple"),
    "v pages": (dict(v_pages=V["v_pages"][:10]), "v_pages must have 40 pages"),
    "no index": (dict(index_pages=None), "k_idx must be an array"),
    "topk": (dict(topk=0), "topk must be an integer >= 1"),
    "implementation": (dict(implementation="cuda"), "implementation must be one of"),
}


@pytest.mark.parametrize("name", list(VALIDATION_CASES))
def test_paged_validation(name):
  override, msg = VALIDATION_CASES[name]
  args = dict(V, **override)
  kw = {k: args.pop(k) for k in ("block_size", "topk", "implementation") if k in args}
  kw.setdefault("block_size", 16)
  with pytest.raises(ValueError, match=msg):
    msa_jax.paged_msa_decode(args["q"], args["q_idx"], args["k_pages"], args["v_pages"],
                             args["index_pages"], args["page_table"], args["lengths"], **kw)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
def test_prefill_over_pages_equals_contiguous(impl):
  """More queries than decode takes (a prefill chunk) over a paged cache: ``msa_attention``
  and ``full_attention`` with ``page_table`` gather the pages and agree with the contiguous
  call on the same tokens, stale page contents (NaN, huge index keys) never reaching them."""
  x = make_paged(batch=3, q_len=24, lengths=(100, 30, 64), q_heads=4, groups=2,
                 dtype=jnp.float32, seed=9)
  assert x["q"].shape[1] > msa_jax.MAX_DECODE_QUERIES
  cache, common = x["cache"], dict(q_positions=x["q_positions"], kv_lengths=x["lengths"],
                                   implementation=impl, interpret=impl != "xla")
  out, ids = msa_jax.msa_attention(x["q"], cache.k_pages, cache.v_pages, x["q_idx"],
                                   cache.index_pages, page_table=cache.page_table,
                                   block_size=x["block_size"], topk=x["topk"],
                                   return_indices=True, **common)
  want_out, want_ids = msa_jax.msa_attention(x["q"], x["k"], x["v"], x["q_idx"], x["k_idx"],
                                             block_size=x["block_size"], topk=x["topk"],
                                             return_indices=True, **common)
  np.testing.assert_array_equal(np.sort(ids, -1), np.sort(want_ids, -1))
  assert C.rel_err(out, want_out) <= 1e-5
  full = msa_jax.full_attention(x["q"], cache.k_pages, cache.v_pages,
                                page_table=cache.page_table, **common)
  assert C.rel_err(full, msa_jax.full_attention(x["q"], x["k"], x["v"], **common)) <= 1e-5


def test_paged_sparse_decode_block_id_validation():
  sel = jnp.full((4, 1, 1, 2), 8, jnp.int32)  # max_pages = 8 blocks
  with pytest.raises(ValueError, match=r"block id in \[0, 8\)"):
    msa_jax.paged_sparse_decode(V["q"], V["k_pages"], V["v_pages"], V["page_table"],
                                V["lengths"], sel, block_size=16)
  with pytest.raises(ValueError, match="block_indices must have shape"):
    msa_jax.paged_sparse_decode(V["q"], V["k_pages"], V["v_pages"], V["page_table"],
                                V["lengths"], jnp.zeros((4, 1, 2, 2), jnp.int32), block_size=16)


def test_compact_selection():
  """Valid ids (in range, first occurrence) first in their order, then 0; counts per row."""
  rng = np.random.default_rng(8)
  nb = 9
  sel = rng.integers(-3, nb + 3, (2, 3, 4, 16)).astype(np.int32)  # holes, repeats, range
  sel[0, 0, 0] = -1
  ids, counts = sched.compact_selection(jnp.asarray(sel), nb)
  for row, got, n in zip(sel.reshape(-1, 16), np.asarray(ids).reshape(-1, 16),
                         np.asarray(counts).reshape(-1)):
    want = list(dict.fromkeys(int(i) for i in row if 0 <= i < nb))
    assert n == len(want)
    np.testing.assert_array_equal(got, want + [0] * (16 - len(want)))
