"""Pallas kernels (interpret mode) against reference.py, on the edge cases of docs/msa.md §8."""

import contextlib
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import msa_jax
from msa_jax import reference
from msa_jax import schedule as sched
from msa_jax.ops.sparse_attention import paths as sparse_paths
from msa_jax.ops.index_topk import gpu_triton as gpu_index
from msa_jax import tuning
from tests import cases as C
from tests import oracle

KERNELS = ["pallas_gpu", "pallas_tpu"]
DTYPES = [jnp.float32, jnp.bfloat16]


def _reference_ids(case, x):
  return reference.index_topk(x["q_idx"], x["k_idx"], x["q_positions"], x["kv_lengths"],
                              block_size=case.block_size, topk=case.topk)


INDEX_VARIANTS = {
    "pallas_gpu": ("pallas_gpu", {}),
    # Selection inside the scoring kernel, with small key tiles so several tiles are merged:
    # per-tile candidates, and the running top-k across all key tiles.
    "pallas_gpu_tile": ("pallas_gpu", {"selection": "tile", "blocks_per_tile": 2}),
    "pallas_gpu_fused": ("pallas_gpu", {"selection": "fused", "blocks_per_tile": 2}),
    "pallas_tpu": ("pallas_tpu", {}),
}


@contextlib.contextmanager
def index_override(**params):
  """Index-kernel parameters for prefill and decode shapes alike."""
  from msa_jax import tuning
  with tuning.override("index", **params), tuning.override("index_decode", **params):
    yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", C.KERNEL_CASES)
@pytest.mark.parametrize("variant", list(INDEX_VARIANTS))
def test_index_topk_kernel(variant, name, dtype):
  impl, params = INDEX_VARIANTS[variant]
  case = C.CASES[name]
  x = C.make_inputs(case, dtype, seed=11)
  with index_override(**params):
    ids = msa_jax.index_topk(x["q_idx"], x["k_idx"], block_size=case.block_size,
                             topk=case.topk, implementation=impl, interpret=True,
                             **C.position_kwargs(x))
  assert ids.shape == (case.batch, case.q_len, case.groups, case.topk) and ids.dtype == jnp.int32
  assert oracle.same_sets(ids, _reference_ids(case, x))


@pytest.mark.parametrize("impl", KERNELS)
def test_block_scores_kernel(impl):
  """The fused score GEMM + max-pool itself, -inf where nothing is visible."""
  from msa_jax.ops.index_topk import gpu_triton as gpu
  from msa_jax.ops.index_topk import tpu as tpu
  kernel = gpu if impl == "pallas_gpu" else tpu
  case = C.CASES["prefill_padding"]
  x = C.make_inputs(case, jnp.float32, seed=12)
  args = (x["q_idx"], x["k_idx"], x["q_positions"], x["kv_lengths"])
  got = np.asarray(kernel.block_scores(*args, block_size=case.block_size, interpret=True))
  want = np.asarray(reference.block_scores(*args, block_size=case.block_size))
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", C.KERNEL_CASES)
@pytest.mark.parametrize("impl", KERNELS)
def test_sparse_attention_kernel(impl, name, dtype):
  case = C.CASES[name]
  x = C.make_inputs(case, dtype, seed=13)
  ids = C.random_selection(case, x, seed=13, holes=True)
  kw = dict(block_size=case.block_size, return_lse=True, **C.position_kwargs(x))
  out, lse = msa_jax.sparse_attention(x["q"], x["k"], x["v"], ids, implementation=impl,
                                      interpret=True, **kw)
  ref_out, ref_lse = msa_jax.sparse_attention(x["q"], x["k"], x["v"], ids,
                                              implementation="xla", **kw)
  assert out.dtype == dtype and out.shape == x["q"].shape
  out32 = np.asarray(out, np.float32)
  assert np.all(np.isfinite(out32))
  assert C.rel_err(out, ref_out) <= (1e-5 if dtype == jnp.float32 else 1e-2)
  finite = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=1e-3)
  assert np.all(out32[~finite] == 0)


@pytest.mark.parametrize("impl", KERNELS)
def test_every_partial_slot_written(impl):
  """Each selected (query, block) slot of the partial buffers holds that block's attention.

  The buffers come out of the kernel uninitialised, so an unwritten slot shows up here as a
  mismatch against the single-block reference.
  """
  case = C.CASES["chunked_prefill_gqa8"]
  x = C.make_inputs(case, jnp.float32, seed=14)
  ids = C.random_selection(case, x, seed=14)
  nb = reference.cdiv(case.kv_len, case.block_size)
  valid = reference.valid_block_mask(ids, nb)
  qpi = sparse_paths._queries_per_item(case.q_heads // case.groups, interpret=True)
  module = importlib.import_module(
      "msa_jax.ops.sparse_attention." + {"pallas_gpu": "gpu_triton", "pallas_tpu": "tpu"}[impl])
  scale = 1 / np.sqrt(case.head_dim)
  pad = nb * case.block_size - case.kv_len
  kp = jnp.pad(x["k"], ((0, 0), (0, pad), (0, 0), (0, 0)))
  vp = jnp.pad(x["v"], ((0, 0), (0, pad), (0, 0), (0, 0)))
  if impl == "pallas_gpu":  # items of 2 tiles sharing one K/V load, 2 items per program
    schedule = sched.build_schedule(ids, valid, x["q_positions"], nb, 2 * qpi)
    p_out, p_lse = module.sparse_attention_partials(
        x["q"], kp, vp, schedule, x["kv_lengths"], block_size=case.block_size, scale=scale,
        topk=case.topk, queries_per_tile=qpi, tiles_per_item=2, items_per_program=2,
        interpret=True)
  else:
    schedule = sched.build_schedule(ids, valid, x["q_positions"], nb, qpi)
    p_out, p_lse = module.sparse_attention_partials(
        x["q"], kp, vp, schedule, x["kv_lengths"], block_size=case.block_size, scale=scale,
        topk=case.topk, queries_per_item=qpi, interpret=True)
  hpg = case.q_heads // case.groups
  for s in range(case.topk):
    want_out, want_lse = reference.sparse_attention(
        x["q"], x["k"], x["v"], ids[..., s:s + 1], x["q_positions"], x["kv_lengths"],
        block_size=case.block_size, scale=scale)
    mask = np.repeat(np.asarray(valid[..., s]), hpg, axis=2)  # [B,T,Hq]
    got_lse, ref_lse = np.asarray(p_lse[s])[mask], np.asarray(want_lse)[mask]
    np.testing.assert_array_equal(np.isfinite(got_lse), np.isfinite(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(got_lse[fin], ref_lse[fin], atol=1e-4)
    np.testing.assert_allclose(np.asarray(p_out[s])[mask], np.asarray(want_out)[mask],
                               atol=1e-5)


def test_tpu_kernels_under_tpu_interpreter():
  """Mosaic-TPU simulation: DMA/semaphore use checked, races detected, NaN-filled memory."""
  case = C.CASES["decode8"]
  x = C.make_inputs(case, jnp.float32, seed=15)
  params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
  ids = msa_jax.index_topk(x["q_idx"], x["k_idx"], block_size=case.block_size, topk=case.topk,
                           kv_lengths=x["kv_lengths"], implementation="pallas_tpu",
                           interpret=params)
  assert oracle.same_sets(ids, _reference_ids(case, x))
  out, lse = msa_jax.sparse_attention(x["q"], x["k"], x["v"], ids, block_size=case.block_size,
                                      kv_lengths=x["kv_lengths"], return_lse=True,
                                      implementation="pallas_tpu", interpret=params)
  ref_out, ref_lse = C.oracle_attention(case, x, ids)
  assert C.rel_err(out, ref_out) <= 1e-5
  np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=1e-4)
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  assert ipc.races is not None and not ipc.races.races_found


@pytest.mark.parametrize("impl", KERNELS)
def test_msa_attention_kernel_dense_equivalence(impl):
  case = C.CASES["dense_equivalent"]
  x = C.make_inputs(case, jnp.float32, seed=16)
  out, ids = msa_jax.msa_attention(x["q"], x["k"], x["v"], x["q_idx"], x["k_idx"],
                                   block_size=case.block_size, topk=case.topk,
                                   implementation=impl, interpret=True, return_indices=True)
  dense = jax.nn.dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
  assert C.rel_err(out, dense) <= 1e-5
  assert ids.shape == (1, case.q_len, 1, case.topk)


def test_full_size_tiles_gpu_kernel(monkeypatch):
  """The GPU KV-outer kernel with the production tile (128 rows: 16 queries of 8 heads)."""
  from msa_jax.ops.sparse_attention import gpu_triton
  case = C.CASES["chunked_prefill_gqa8"]
  x = C.make_inputs(case, jnp.float32, seed=17)
  ids = C.random_selection(case, x, seed=17)
  monkeypatch.setattr(sparse_paths, "INTERPRET_TILE_ROWS", sparse_paths.TILE_ROWS)
  tiles, run = [], gpu_triton.sparse_attention_partials
  monkeypatch.setattr(gpu_triton, "sparse_attention_partials",
                      lambda *a, **kw: tiles.append(kw["queries_per_tile"]) or run(*a, **kw))
  out = msa_jax.sparse_attention(x["q"], x["k"], x["v"], ids, block_size=case.block_size,
                                 q_positions=x["q_positions"], kv_lengths=x["kv_lengths"],
                                 implementation="pallas_gpu", interpret=True)
  assert tiles == [sparse_paths.TILE_ROWS // (case.q_heads // case.groups)]
  ref_out, _ = C.oracle_attention(case, x, ids)
  assert C.rel_err(out, ref_out) <= 1e-5


@pytest.mark.parametrize("case_name,params", [
    # Work items of several tiles (one K/V load streamed over them).
    ("chunked_prefill_gqa8", {"tiles_per_item": 3, "items_per_program": 1}),
    ("prefill_padding", {"tiles_per_item": 2, "items_per_program": 3}),
    # The query range in pieces (the last one shorter), each its own schedule, kernel and
    # combine.
    ("chunked_prefill_gqa8", {"query_chunk": 5}),
    ("prefill_padding", {"query_chunk": 40}),
])
def test_gpu_path_variants(case_name, params):
  """Launch variants of the GPU KV-outer path, through the public API, against the oracle."""
  case = C.CASES[case_name]
  if "query_chunk" in params:  # several pieces, a short last one
    assert case.q_len > params["query_chunk"] and case.q_len % params["query_chunk"]
  x = C.make_inputs(case, jnp.float32, seed=18)
  ids = C.random_selection(case, x, seed=18, holes=True)
  with tuning.override("sparse", **params):
    out, lse = msa_jax.sparse_attention(
        x["q"], x["k"], x["v"], ids, block_size=case.block_size, q_positions=x["q_positions"],
        kv_lengths=x["kv_lengths"], return_lse=True, implementation="pallas_gpu",
        interpret=True)
  ref_out, ref_lse = C.oracle_attention(case, x, ids)
  assert C.rel_err(out, ref_out) <= 1e-5
  fin = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
  np.testing.assert_allclose(np.asarray(lse)[fin], ref_lse[fin], atol=1e-4)


@pytest.mark.parametrize("impl", KERNELS)
def test_gradient_through_kernel_path(impl):
  case = C.CASES["decode8"]
  x = C.make_inputs(case, jnp.float32, seed=18)
  ids = C.random_selection(case, x, seed=18)

  def loss(impl, q, k, v):
    out = msa_jax.sparse_attention(q, k, v, ids, block_size=case.block_size,
                                   kv_lengths=x["kv_lengths"], implementation=impl,
                                   interpret=impl != "xla")
    return jnp.sum(out * jnp.cos(out))

  got = jax.grad(lambda *a: loss(impl, *a), (0, 1, 2))(x["q"], x["k"], x["v"])
  want = jax.grad(lambda *a: loss("xla", *a), (0, 1, 2))(x["q"], x["k"], x["v"])
  for a, b in zip(got, want):
    assert C.rel_err(a, b) <= 1e-5


def test_kernels_under_jit():
  case = C.CASES["decode_gqa16"]
  x = C.make_inputs(case, jnp.bfloat16, seed=19)
  f = jax.jit(lambda *a: msa_jax.msa_attention(*a, block_size=case.block_size, topk=case.topk,
                                               kv_lengths=x["kv_lengths"],
                                               implementation="pallas_gpu", interpret=True))
  out = f(x["q"], x["k"], x["v"], x["q_idx"], x["k_idx"])
  ref = msa_jax.msa_attention(x["q"], x["k"], x["v"], x["q_idx"], x["k_idx"],
                              block_size=case.block_size, topk=case.topk,
                              kv_lengths=x["kv_lengths"], implementation="xla")
  assert C.rel_err(out, ref) <= 1e-2


@pytest.mark.parametrize("name,num_splits", [("decode8_gqa16", 1), ("decode8_gqa16", 2),
                                             ("decode8_gqa16", 5), ("decode_gqa16", 4)])
def test_decode_kernel_split_k(name, num_splits):
  """The GPU query-outer split-K decode kernel on a contiguous cache seen as pages (as
  ``msa_attention`` runs it: no page table) and through a shuffled page table: any split
  count merges to the reference, through ``schedule.combine`` and through the decode's own
  merge (a kernel for power-of-two split counts, XLA otherwise). The selection goes in raw
  (holes, repeats, out-of-range ids: the kernel compacts it); queries with nothing selected
  get out 0 and LSE -inf."""
  from msa_jax.ops.sparse_attention import gpu_triton_paged as paged_sparse_decode
  case = C.CASES[name]
  x = C.make_inputs(case, jnp.float32, seed=22)
  ids = C.random_selection(case, x, seed=22, holes=True).at[0, 0, 0].set(-1)  # no blocks
  nb = reference.cdiv(case.kv_len, case.block_size)
  ids = ids.at[-1, -1, -1, -1].set(nb + 3)  # past the cache: no block
  pad = nb * case.block_size - case.kv_len
  b, g = x["k"].shape[0], x["k"].shape[2]
  pages = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
      b * nb, case.block_size, g, a.shape[-1])
  perm = np.random.default_rng(22).permutation(b * nb)
  shuffled = lambda a: pages(a)[np.argsort(perm)]
  table = jnp.asarray(perm.reshape(b, nb), jnp.int32)
  scale = 1 / np.sqrt(case.head_dim)
  ref_out, ref_lse = C.oracle_attention(case, x, ids)
  heads = x["q"].shape[2] // g
  for cache in [(pages(x["k"]), pages(x["v"]), None),
                (shuffled(x["k"]), shuffled(x["v"]), table)]:
    p_out, p_lse = paged_sparse_decode.paged_sparse_decode_partials(
        x["q"], *cache, ids, x["q_positions"], x["kv_lengths"], block_size=case.block_size,
        scale=scale, num_splits=num_splits, interpret=True)
    assert p_out.shape[0] == num_splits
    out, lse = sched.combine(p_out, p_lse, jnp.ones((*ids.shape[:3], num_splits), bool),
                             jnp.float32)
    assert C.rel_err(out, ref_out) <= 1e-5
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=1e-4)
    merged_out, merged_lse = paged_sparse_decode.paged_sparse_decode(
        x["q"], *cache, ids, x["q_positions"], x["kv_lengths"], block_size=case.block_size,
        scale=scale, num_splits=num_splits, interpret=True)
    assert merged_out.dtype == x["q"].dtype
    np.testing.assert_allclose(np.asarray(merged_out), np.asarray(out), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(merged_lse), np.asarray(lse), rtol=1e-6)
    assert np.all(np.asarray(merged_out)[0, 0, :heads] == 0)
    assert np.all(np.asarray(merged_lse)[0, 0, :heads] == -np.inf)
  # Compacted by the caller (as full attention's every-block selection comes): the same.
  compact, counts = sched.compact_selection(ids, nb)
  given_out, given_lse = paged_sparse_decode.paged_sparse_decode(
      x["q"], pages(x["k"]), pages(x["v"]), None, compact, x["q_positions"], x["kv_lengths"],
      block_size=case.block_size, scale=scale, counts=counts, num_splits=num_splits,
      interpret=True)
  np.testing.assert_allclose(np.asarray(given_out), np.asarray(merged_out), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(given_lse), np.asarray(merged_lse), rtol=1e-6)


def test_gpu_decode_uses_query_outer_kernel(monkeypatch):
  from msa_jax.ops.sparse_attention import gpu_triton as kv_outer

  def boom(*a, **k):
    raise AssertionError("KV-outer kernel used for decode")

  monkeypatch.setattr(kv_outer, "sparse_attention_partials", boom)
  case = C.CASES["decode_gqa16"]
  x = C.make_inputs(case, jnp.float32, seed=23)
  ids = C.random_selection(case, x, seed=23)
  out = msa_jax.sparse_attention(x["q"], x["k"], x["v"], ids, block_size=case.block_size,
                                 kv_lengths=x["kv_lengths"], implementation="pallas_gpu",
                                 interpret=True)
  assert C.rel_err(out, C.oracle_attention(case, x, ids)[0]) <= 1e-5


def test_gpu_kernel_several_items_per_program(monkeypatch):
  """The KV-outer GPU kernel looping over several work items per program (padded tail)."""
  from msa_jax import tuning
  monkeypatch.setitem(tuning.DEFAULTS, "sparse", dataclasses.replace(tuning.DEFAULTS["sparse"],
                                                                     items_per_program=3))
  case = C.CASES["prefill_padding"]
  x = C.make_inputs(case, jnp.bfloat16, seed=24)
  ids = C.random_selection(case, x, seed=24, holes=True)
  out = msa_jax.sparse_attention(x["q"], x["k"], x["v"], ids, block_size=case.block_size,
                                 kv_lengths=x["kv_lengths"], implementation="pallas_gpu",
                                 interpret=True)
  assert C.rel_err(out, C.oracle_attention(case, x, ids)[0]) <= 1e-2


@pytest.mark.parametrize("selection,blocks_per_tile", [("tile", 1), ("tile", 4),
                                                       ("fused", 4), ("fused", 16)])
def test_kernel_selection_many_blocks(selection, blocks_per_tile):
  """In-kernel selection over many key tiles (> 512 blocks: the two-stage final top-k too)."""
  rng = np.random.default_rng(41)
  b, t, s, g, di, bs, k = 1, 5, 1100, 2, 4, 2, 6
  q_idx = jnp.asarray(rng.integers(-2, 3, (b, t, g, di)), jnp.float32)  # many ties
  k_idx = jnp.asarray(rng.integers(-2, 3, (b, s, di)), jnp.float32)
  with index_override(selection=selection, blocks_per_tile=blocks_per_tile):
    ids = msa_jax.index_topk(q_idx, k_idx, block_size=bs, topk=k, implementation="pallas_gpu",
                             interpret=True)
  pos = (s - t + np.arange(t))[None]
  want = oracle.index_topk(np.asarray(q_idx), np.asarray(k_idx), bs, k, pos, np.array([s]))
  assert oracle.same_sets(ids, want)


@pytest.mark.parametrize("n_tiles,kk,topk", [(64, 16, 16), (5, 4, 16), (40, 2, 3)])
def test_merge_candidates(monkeypatch, n_tiles, kk, topk):
  """Decode's merge kernel equals ``reference.top_candidates`` on tile-by-tile candidates
  (each tile sorted by value, lower id first among ties; many ties, rows with nothing
  finite, fewer finite candidates than topk), and so does its XLA fallback for long rows."""
  rng = np.random.default_rng(n_tiles + topk)
  lead, bpt = (2, 3, 4), 2 * kk
  vals = rng.integers(-3, 4, (*lead, n_tiles, bpt)).astype(np.float32)
  vals[0, 0, 0] = -np.inf
  vals[1, 2, 3, 1:] = -np.inf
  vals[1, 0, 2, 2, 3] = np.inf  # a forced own block
  ids = np.broadcast_to(np.arange(n_tiles * bpt).reshape(n_tiles, bpt), vals.shape)
  order = np.argsort(-vals, axis=-1, kind="stable")[..., :kk]  # each tile's top kk
  tile_vals = np.take_along_axis(vals, order, -1).reshape(*lead, -1)
  tile_ids = np.take_along_axis(ids, order, -1).reshape(*lead, -1)
  want = reference.top_candidates(jnp.asarray(tile_vals), jnp.asarray(tile_ids), topk)
  got = gpu_index.merge_candidates(jnp.asarray(tile_vals), jnp.asarray(tile_ids), topk,
                                   interpret=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  monkeypatch.setattr(gpu_index, "MERGE_MAX_CANDIDATES", 8)
  fallback = gpu_index.merge_candidates(jnp.asarray(tile_vals), jnp.asarray(tile_ids), topk)
  np.testing.assert_array_equal(np.asarray(fallback), np.asarray(want))


def test_decode_key_tiles_spread_over_the_gpu():
  """Few query rows (decode): blocks per key tile shrink until the grid is min_programs."""
  spread = gpu_index.spread_blocks_per_tile
  assert spread(32, 64, 1, 132) == 1  # an 8K cache: 64 one-block tiles, not 2 of 32
  assert spread(32, 1024, 1, 132) == 4  # 128K: 256 tiles
  assert spread(32, 8192, 1, 132) == 32  # 1M: 256 tiles already fill the GPU
  assert spread(32, 1024, 8, 132) == 32  # 8 row tiles x 32 key tiles
  assert spread(32, 64, 1, 0) == 32  # no minimum: the table's value


def test_decode_selection_with_spread_tiles_matches_oracle():
  """One block per key tile (what the spread gives an 8K cache): every block a candidate."""
  rng = np.random.default_rng(43)
  b, s, g, di, bs, k = 2, 300, 2, 8, 4, 5
  q_idx = jnp.asarray(rng.standard_normal((b, 1, g, di)), jnp.float32)
  k_idx = jnp.asarray(rng.standard_normal((b, s, di)), jnp.float32)
  lengths = np.array([300, 137])
  with index_override(selection="tile", blocks_per_tile=1):
    ids = msa_jax.index_topk(q_idx, k_idx, block_size=bs, topk=k,
                             q_positions=lengths[:, None] - 1,
                             kv_lengths=jnp.asarray(lengths), implementation="pallas_gpu",
                             interpret=True)
  want = oracle.index_topk(np.asarray(q_idx), np.asarray(k_idx), bs, k, lengths[:, None] - 1,
                           lengths)
  assert oracle.same_sets(ids, want)
