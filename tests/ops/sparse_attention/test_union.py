"""The union-tile forward (ops/sparse_attention/gpu_triton_union.py) in interpret mode against
the float64 oracle, and its per-tile unions against sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import reference
from msa_jax.ops.sparse_attention import gpu_triton_union as union_kernel
from tests import cases as C


def test_tile_unions_match_sets():
  rng = np.random.default_rng(0)
  ids = rng.integers(-1, 9, size=(2, 13, 3, 4)).astype(np.int32)  # -1, repeats, >= 8: invalid
  valid = np.asarray(reference.valid_block_mask(jnp.asarray(ids), 8))
  union, counts, members = (np.asarray(x) for x in union_kernel.tile_unions(
      jnp.asarray(ids), jnp.asarray(valid), 5))
  assert union.shape == (2, 3, 3, 20)
  for b in range(2):
    for tile in range(3):
      for g in range(3):
        queries = range(tile * 5, min(tile * 5 + 5, 13))
        chosen = [{int(i) for i, ok in zip(ids[b, t, g], valid[b, t, g]) if ok}
                  for t in queries]
        want = sorted(set().union(*chosen))
        n = counts[b, tile, g]
        assert list(union[b, tile, g, :n]) == want and (union[b, tile, g, n:] == -1).all()
        for u, blk in enumerate(want):
          bits = [j for j, c in enumerate(chosen) if blk in c]
          assert members[b, tile, g, u] == sum(1 << j for j in bits)


@pytest.mark.parametrize("name", ["prefill_padding", "partial_block_gqa1",
                                  "chunked_prefill_gqa8", "decode8_gqa16"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_union_forward_matches_oracle(name, dtype):
  """Random selections with -1 slots and repeats; ragged lengths, partial blocks, chunked
  prefill, GQA 1-16; tiles of 4 queries so several tiles and a partial last one run."""
  case = C.CASES[name]
  inputs = C.make_inputs(case, dtype)
  ids = C.random_selection(case, inputs, holes=True)
  nb = reference.cdiv(case.kv_len, case.block_size)
  pad = nb * case.block_size - case.kv_len
  k = jnp.pad(inputs["k"], ((0, 0), (0, pad), (0, 0), (0, 0)))
  v = jnp.pad(inputs["v"], ((0, 0), (0, pad), (0, 0), (0, 0)))
  scale = 1 / np.sqrt(case.head_dim)
  out, lse = union_kernel.sparse_attention(
      inputs["q"], k, v, ids, reference.valid_block_mask(ids, nb), inputs["q_positions"],
      inputs["kv_lengths"], block_size=case.block_size, scale=scale, queries_per_tile=4,
      interpret=True)
  want_out, want_lse = C.oracle_attention(case, inputs, ids, scale)
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  assert C.rel_err(out, want_out) < tol
  lse, want_lse = np.asarray(lse), np.asarray(want_lse)
  assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))  # padding queries
  finite = np.isfinite(want_lse)
  np.testing.assert_allclose(lse[finite], want_lse[finite], atol=1e-2 if dtype != jnp.float32
                             else 1e-4)


def test_masked_nan_values_do_not_reach_outputs():
  """NaN in V past the length and in a block a query did not select stay out of its output;
  a NaN value a query sees makes its output NaN, as exact attention does."""
  case = C.CASES["prefill_padding"]
  inputs = C.make_inputs(case, jnp.float32)
  ids = C.random_selection(case, inputs)
  v = np.asarray(inputs["v"]).copy()
  v[1, 80:] = np.nan  # the second sequence's length is 70
  k = inputs["k"]
  nb = reference.cdiv(case.kv_len, case.block_size)
  out, _ = union_kernel.sparse_attention(
      inputs["q"], k, jnp.asarray(v), ids, reference.valid_block_mask(ids, nb),
      inputs["q_positions"], inputs["kv_lengths"], block_size=case.block_size,
      scale=0.1, queries_per_tile=4, interpret=True)
  assert np.isfinite(np.asarray(out)[1]).all()
  v[0, 5] = np.nan  # key 5 of block 0: visible to every query of sequence 0 that chose it
  out, _ = union_kernel.sparse_attention(
      inputs["q"], k, jnp.asarray(v), ids, reference.valid_block_mask(ids, nb),
      inputs["q_positions"], inputs["kv_lengths"], block_size=case.block_size,
      scale=0.1, queries_per_tile=4, interpret=True)
  positions = np.asarray(inputs["q_positions"])[0]
  sees = np.any(np.asarray(ids)[0] == 0, axis=-1) & (positions >= 5)[:, None]  # [T, G]
  nan = np.isnan(np.asarray(out)[0]).any(axis=-1)  # [T, Hq]
  heads = case.q_heads // case.groups
  assert np.array_equal(nan, np.repeat(sees, heads, axis=1))


# ----------------------------------------------------------------------------- Mosaic GPU


@pytest.mark.parametrize("name,stages", [("chunked_gqa8", 2), ("prefill_gqa16", 3)])
def test_mosaic_union_forward_matches_oracle(name, stages):
  """The Mosaic GPU union kernel (bf16) under the Mosaic GPU interpreter (barrier phases and
  races checked, NaN-filled memory) or compiled on a GPU: selections with -1 slots and
  repeats, ragged lengths, a partial last tile."""
  from msa_jax.ops.sparse_attention import gpu_mosaic_union as union_mgpu
  from tests.ops.sparse_attention.test_gpu_mosaic import CASES as MGPU_CASES, interpreted
  case = MGPU_CASES[name]
  inputs = C.make_inputs(case, jnp.bfloat16, seed=5)
  ids = C.random_selection(case, inputs, seed=5, holes=True)
  nb = reference.cdiv(case.kv_len, case.block_size)
  pad = nb * case.block_size - case.kv_len
  k = jnp.pad(inputs["k"], ((0, 0), (0, pad), (0, 0), (0, 0)))
  v = jnp.pad(inputs["v"], ((0, 0), (0, pad), (0, 0), (0, 0)))
  scale = 1 / np.sqrt(case.head_dim)
  with interpreted() as params:
    out, lse = union_mgpu.sparse_attention(
        inputs["q"], k, v, ids, reference.valid_block_mask(ids, nb), inputs["q_positions"],
        inputs["kv_lengths"], block_size=case.block_size, scale=scale, num_stages=stages,
        interpret=params)
    out.block_until_ready()
  want_out, want_lse = C.oracle_attention(case, inputs, ids, scale)
  assert C.rel_err(out, want_out) < 1e-2
  lse, want_lse = np.asarray(lse), np.asarray(want_lse)
  assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))
  finite = np.isfinite(want_lse)
  np.testing.assert_allclose(lse[finite], want_lse[finite], atol=1e-2)


def test_mosaic_union_lowers_for_hopper_at_m3_shapes():
  """Pallas -> Mosaic GPU lowering at M3 shapes (16 heads per group: 8-query tiles, D 128,
  Bk 128), on CPU through ``jax.export`` for CUDA."""
  from msa_jax.ops.sparse_attention import gpu_mosaic_union as union_mgpu
  b, t, s_len, hq, g, d, bk, topk = 1, 64, 1024, 64, 4, 128, 128, 16
  nb = s_len // bk

  def fn(q, k, v, ids, pos, kvl):
    return union_mgpu.sparse_attention(q, k, v, ids, reference.valid_block_mask(ids, nb), pos,
                                       kvl, block_size=bk, scale=d**-0.5, num_stages=3)

  assert C.lowers_to_mosaic_gpu(fn, *C.attention_specs(b, t, s_len, hq, g, d, topk))


@pytest.mark.parametrize("union_max", [1000, 0.5])
def test_api_chooses_union_or_kv_outer_by_mean_union(monkeypatch, union_max):
  """With the Mosaic kernels, ``sparse_attention`` runs the union kernel when the tiles' mean
  union is at most ``union_max`` and KV-outer otherwise. The branch not meant to run is
  poisoned (NaN), so a wrong choice fails."""
  import msa_jax
  from msa_jax.ops.sparse_attention import gpu_mosaic as mgpu
  from msa_jax.ops.sparse_attention import gpu_mosaic_union as union_mgpu
  from msa_jax import tuning
  from tests.ops.sparse_attention.test_gpu_mosaic import CASES as MGPU_CASES, interpreted
  case = MGPU_CASES["prefill_gqa16"]
  inputs = C.make_inputs(case, jnp.bfloat16, seed=6)
  ids = C.random_selection(case, inputs, seed=6)
  poisoned = lambda fn: lambda *a, **kw: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan),
                                                      fn(*a, **kw))
  if union_max >= 1:
    monkeypatch.setattr(mgpu, "sparse_attention_partials",
                        poisoned(mgpu.sparse_attention_partials))
  else:
    monkeypatch.setattr(union_mgpu, "sparse_attention", poisoned(union_mgpu.sparse_attention))
  with tuning.override("sparse", kernel="mosaic", union_max=union_max,
                       union_mix=False), \
      interpreted() as params:
    out, lse = msa_jax.sparse_attention(inputs["q"], inputs["k"], inputs["v"], ids,
                                        block_size=case.block_size,
                                        kv_lengths=inputs["kv_lengths"], return_lse=True,
                                        implementation="pallas_gpu", interpret=params)
    out.block_until_ready()
  want_out, want_lse = C.oracle_attention(case, inputs, ids)
  assert C.rel_err(out, want_out) < 1e-2
  finite = np.isfinite(want_lse)
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=1e-2)


def test_mean_union_counts_only_tiles_with_blocks():
  from msa_jax.ops.sparse_attention import gpu_mosaic_union as union_mgpu
  ids = jnp.array([[[[0, 1]], [[1, 2]], [[-1, -1]], [[-1, -1]]]], jnp.int32)  # [1, 4, 1, 2]
  valid = ids >= 0
  unions = union_kernel.tile_unions(ids, valid, 2)  # tiles {0, 1, 2} and {}
  assert float(union_mgpu.mean_union(unions)) == 3.0


@pytest.mark.parametrize("union_max,want", [(2, "mixed"), (100, "union"), (0.5, "kv_outer")])
def test_per_tile_choice(union_max, want):
  """``union_mix``: tiles whose union has at most ``union_max`` blocks take the union path,
  the others KV-outer (fake paths that mark which one produced each query); when all tiles go
  one way only that path's output is used."""
  from msa_jax.ops.sparse_attention import paths as sparse_paths
  from msa_jax.ops.sparse_attention import gpu_mosaic_union as union_mgpu
  heads, per_tile = 16, union_mgpu.queries_per_tile(16)  # 8 queries per tile
  b, t, g, k = 1, 3 * per_tile - 3, 1, 2
  ids = np.zeros((b, t, g, k), np.int32)
  ids[:, :per_tile] = [0, 1]  # tile 0: union {0, 1}
  ids[:, per_tile:2 * per_tile] = np.arange(per_tile * k).reshape(per_tile, 1, k)  # 16 blocks
  ids[:, 2 * per_tile:] = -1  # tile 2: nothing selected
  ids = jnp.asarray(ids)
  valid = ids >= 0
  unions = union_mgpu.tile_unions(ids, valid, heads)
  hq = g * heads

  def union(u):  # 1 where the query's tile has blocks in the unions given
    has = jnp.repeat(u[1] > 0, per_tile, axis=1)[:, :t]
    out = jnp.broadcast_to(jnp.repeat(has, heads, axis=2)[..., None], (b, t, hq, 4))
    return out.astype(jnp.float32), jnp.zeros((b, t, hq))

  def kv_outer(live=valid):  # 2 where the query has live slots
    has = jnp.repeat(jnp.any(live, axis=-1), heads, axis=2)
    return jnp.broadcast_to(2.0 * has[..., None], (b, t, hq, 4)), jnp.ones((b, t, hq))

  out, lse = jax.jit(lambda: sparse_paths._union_per_tile(unions, union_max, union, kv_outer, valid,
                                                 heads))()
  got = np.asarray(out)[0, ::per_tile, 0, 0]  # one query per tile
  expect = {"mixed": [1, 2, 0], "union": [1, 1, 0], "kv_outer": [2, 2, 0]}[want]
  np.testing.assert_array_equal(got, expect)
  if want == "mixed":
    np.testing.assert_array_equal(np.asarray(lse)[0, ::per_tile, 0], [0, 1, 0])


def test_api_per_tile_mix_matches_oracle():
  """The Mosaic union and KV-outer kernels in one call (``union_mix``), on a selection whose
  tiles alternate shared and scattered blocks: every query matches the oracle."""
  import msa_jax
  from msa_jax import tuning
  from tests.ops.sparse_attention.test_gpu_mosaic import CASES as MGPU_CASES, interpreted
  case = MGPU_CASES["prefill_gqa16"]  # 8-query tiles, 4 blocks
  inputs = C.make_inputs(case, jnp.bfloat16, seed=7)
  ids = np.array(C.random_selection(case, inputs, seed=7))
  tile = (np.arange(case.q_len) // 8) % 2 == 0
  own = np.maximum(np.asarray(inputs["q_positions"]), 0) // case.block_size  # [B, T]
  ids[:, tile] = -1
  for row in range(ids.shape[0]):  # even tiles: each query's own block only
    ids[row, tile, :, 0] = own[row, tile, None]
  ids = jnp.asarray(ids)
  with tuning.override("sparse", kernel="mosaic", union_max=2, union_mix=True), \
      interpreted() as params:
    out, lse = msa_jax.sparse_attention(inputs["q"], inputs["k"], inputs["v"], ids,
                                        block_size=case.block_size,
                                        kv_lengths=inputs["kv_lengths"], return_lse=True,
                                        implementation="pallas_gpu", interpret=params)
  want_out, want_lse = C.oracle_attention(case, inputs, ids)
  assert C.rel_err(out, want_out) < 1e-2
  finite = np.isfinite(want_lse)
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=1e-2)
