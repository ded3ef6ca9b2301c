"""reference.py (the "xla" implementation) against the brute-force float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msa_jax
from tests import cases as C
from tests import oracle


def _oracle_ids(case, x):
  f64 = lambda a: np.asarray(a, np.float64)
  return oracle.index_topk(f64(x["q_idx"]), f64(x["k_idx"]), case.block_size, case.topk,
                           np.asarray(x["q_positions"]), np.asarray(x["kv_lengths"]))


@pytest.mark.parametrize("name", list(C.CASES))
def test_index_topk_matches_oracle(name):
  case = C.CASES[name]
  x = C.make_inputs(case, jnp.float32, seed=1)
  ids = msa_jax.index_topk(x["q_idx"], x["k_idx"], block_size=case.block_size, topk=case.topk,
                           implementation="xla", **C.position_kwargs(x))
  assert ids.shape == (case.batch, case.q_len, case.groups, case.topk)
  assert ids.dtype == jnp.int32
  assert oracle.same_sets(ids, _oracle_ids(case, x))
  ids = np.asarray(ids)
  # Valid entries form a prefix, -1 padding after it, no block twice.
  valid = ids >= 0
  assert np.all(valid[..., :-1] | ~valid[..., 1:])
  for row in ids.reshape(-1, case.topk):
    row = row[row >= 0]
    assert len(set(row.tolist())) == len(row)


def test_index_topk_padding_queries_and_own_block():
  case = C.CASES["prefill_padding"]
  x = C.make_inputs(case, jnp.float32, seed=2)
  ids = np.asarray(msa_jax.index_topk(x["q_idx"], x["k_idx"], block_size=case.block_size,
                                      topk=case.topk, implementation="xla",
                                      **C.position_kwargs(x)))
  pos = np.asarray(x["q_positions"])
  assert np.all(ids[pos < 0] == -1)  # padding queries select nothing
  own = pos // case.block_size
  for b, t in zip(*np.nonzero(pos >= 0)):
    for g in range(case.groups):
      assert own[b, t] in ids[b, t, g]
      n_visible_blocks = own[b, t] + 1
      assert np.sum(ids[b, t, g] >= 0) == min(case.topk, n_visible_blocks)


def test_ties_prefer_lower_block_id():
  # Every key scores the same: the earliest blocks must be chosen beside the own block.
  b, t, s, g, di, bs, k = 1, 1, 160, 1, 8, 16, 4
  q_idx = jnp.ones((b, t, g, di))
  k_idx = jnp.ones((b, s, di))
  ids = msa_jax.index_topk(q_idx, k_idx, block_size=bs, topk=k, implementation="xla")
  assert sorted(np.asarray(ids)[0, 0, 0].tolist()) == [0, 1, 2, 9]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(C.CASES))
def test_sparse_attention_matches_oracle(name, dtype):
  case = C.CASES[name]
  x = C.make_inputs(case, dtype, seed=3)
  ids = C.random_selection(case, x, seed=3, holes=True)
  out, lse = msa_jax.sparse_attention(x["q"], x["k"], x["v"], ids, block_size=case.block_size,
                                      return_lse=True, implementation="xla",
                                      **C.position_kwargs(x))
  assert out.dtype == dtype and lse.dtype == jnp.float32
  ref_out, ref_lse = C.oracle_attention(case, x, ids)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  assert C.rel_err(out, ref_out) <= tol
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], ref_lse[finite],
                             atol=1e-3 if dtype == jnp.float32 else 2e-2)
  assert np.all(np.asarray(out, np.float32)[~finite] == 0)  # no visible key: zero output


def test_dense_equivalence():
  case = C.CASES["dense_equivalent"]
  x = C.make_inputs(case, jnp.float32, seed=4)
  out = msa_jax.msa_attention(x["q"], x["k"], x["v"], x["q_idx"], x["k_idx"],
                              block_size=case.block_size, topk=case.topk, implementation="xla")
  dense = jax.nn.dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
  assert C.rel_err(out, dense) <= 1e-5


def test_msa_not_dense_when_k_is_small():
  case = C.CASES["ties"]
  x = C.make_inputs(case, jnp.float32, seed=5)
  out, ids = msa_jax.msa_attention(x["q"], x["k"], x["v"], x["q_idx"], x["k_idx"],
                                   block_size=case.block_size, topk=2, implementation="xla",
                                   return_indices=True)
  ref_out, _ = C.oracle_attention(case, x, ids)
  dense = jax.nn.dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
  assert C.rel_err(out, ref_out) <= 1e-5
  assert C.rel_err(out, dense) > 1e-2


@pytest.mark.parametrize("name", ["prefill_padding", "chunked_prefill_gqa8", "decode8"])
def test_indexer_kl_loss_matches_oracle(name):
  case = C.CASES[name]
  x = C.make_inputs(case, jnp.float32, seed=6)
  ids = C.random_selection(case, x, seed=6)
  loss = msa_jax.indexer_kl_loss(x["q"], x["k"], x["q_idx"], x["k_idx"], ids,
                                 block_size=case.block_size, **C.position_kwargs(x))
  f64 = lambda a: np.asarray(a, np.float64)
  ref = oracle.indexer_kl_loss(f64(x["q"]), f64(x["k"]), f64(x["q_idx"]), f64(x["k_idx"]),
                               np.asarray(ids), case.block_size, 1 / np.sqrt(case.head_dim),
                               np.asarray(x["q_positions"]), np.asarray(x["kv_lengths"]))
  assert ref > 0
  np.testing.assert_allclose(float(loss), ref, rtol=1e-4)


def test_indexer_kl_loss_gradients_reach_index_branch_only():
  case = C.CASES["prefill_padding"]
  x = C.make_inputs(case, jnp.float32, seed=7)
  ids = C.random_selection(case, x, seed=7)

  def loss(q, k, q_idx, k_idx):
    return msa_jax.indexer_kl_loss(q, k, q_idx, k_idx, ids, block_size=case.block_size,
                                   kv_lengths=x["kv_lengths"])

  dq, dk, dqi, dki = jax.grad(loss, argnums=(0, 1, 2, 3))(x["q"], x["k"], x["q_idx"],
                                                          x["k_idx"])
  assert np.all(np.asarray(dq) == 0) and np.all(np.asarray(dk) == 0)
  assert np.all(np.isfinite(dqi)) and np.abs(np.asarray(dqi)).max() > 0
  assert np.abs(np.asarray(dki)).max() > 0
  # Teacher == student makes the loss zero: q_idx.k_idx/sqrt(Di) matching the group mean is
  # impossible in general, so check instead that the loss is non-negative and decreases
  # along the negative gradient.
  l0 = loss(x["q"], x["k"], x["q_idx"], x["k_idx"])
  l1 = loss(x["q"], x["k"], x["q_idx"] - 1e-2 * dqi, x["k_idx"] - 1e-2 * dki)
  assert 0 <= float(l1) < float(l0)


def test_indexer_kl_loss_gradient_matches_float64_oracle():
  """Directional derivatives of the loss in q_idx / k_idx against central differences of the
  independent float64 NumPy oracle."""
  case = C.CASES["chunked_prefill_gqa8"]
  x = C.make_inputs(case, jnp.float32, seed=9)
  ids = C.random_selection(case, x, seed=9, holes=True)
  scale = 1 / np.sqrt(case.head_dim)
  f64 = lambda a: np.asarray(a, np.float64)
  args = (f64(x["q"]), f64(x["k"]))
  rest = (np.asarray(ids), case.block_size, scale, np.asarray(x["q_positions"]),
          np.asarray(x["kv_lengths"]))
  dqi, dki = jax.grad(
      lambda qi, ki: msa_jax.indexer_kl_loss(x["q"], x["k"], qi, ki, ids,
                                             block_size=case.block_size,
                                             **C.position_kwargs(x)), (0, 1))(x["q_idx"],
                                                                              x["k_idx"])
  rng = np.random.default_rng(9)
  for _ in range(3):
    u, w = rng.normal(size=x["q_idx"].shape), rng.normal(size=x["k_idx"].shape)
    eps = 1e-5
    plus = oracle.indexer_kl_loss(*args, f64(x["q_idx"]) + eps * u, f64(x["k_idx"]) + eps * w,
                                  *rest)
    minus = oracle.indexer_kl_loss(*args, f64(x["q_idx"]) - eps * u, f64(x["k_idx"]) - eps * w,
                                   *rest)
    numeric = (plus - minus) / (2 * eps)
    analytic = float(np.sum(np.asarray(dqi, np.float64) * u)
                     + np.sum(np.asarray(dki, np.float64) * w))
    assert abs(numeric) > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=2e-3)


def test_sparse_attention_gradient_matches_dense_masked():
  # With every block selected, gradients equal those of dense causal attention.
  case = C.CASES["dense_equivalent"]
  x = C.make_inputs(case, jnp.float32, seed=8)
  nb = case.kv_len // case.block_size
  ids = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (1, case.q_len, 1, nb))
  f = lambda q, k, v: jnp.sum(jnp.sin(msa_jax.sparse_attention(
      q, k, v, ids, block_size=case.block_size, implementation="xla")))
  g = lambda q, k, v: jnp.sum(jnp.sin(jax.nn.dot_product_attention(q, k, v, is_causal=True)))
  for a, b in zip(jax.grad(f, (0, 1, 2))(x["q"], x["k"], x["v"]),
                  jax.grad(g, (0, 1, 2))(x["q"], x["k"], x["v"])):
    assert C.rel_err(a, b) <= 1e-5


def test_query_chunking_matches_unchunked():
  from msa_jax import reference
  case = C.CASES["prefill_padding"]
  x = C.make_inputs(case, jnp.float32, seed=9)
  ids = C.random_selection(case, x, seed=9)
  args = (x["q"], x["k"], x["v"], ids, x["q_positions"], x["kv_lengths"])
  full = reference.sparse_attention(*args, block_size=case.block_size, scale=0.2)
  chunked = reference.sparse_attention(*args, block_size=case.block_size, scale=0.2,
                                       chunk_size=40)
  for a, b in zip(full, chunked):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  sel = reference.index_topk(x["q_idx"], x["k_idx"], x["q_positions"], x["kv_lengths"],
                             block_size=case.block_size, topk=case.topk, chunk_size=40)
  assert oracle.same_sets(sel, _oracle_ids(case, x))


@pytest.mark.parametrize("n,k", [(600, 16), (1000, 5), (2049, 16), (513, 128)])
def test_two_stage_top_k_equals_top_k(n, k):
  from msa_jax import reference
  rng = np.random.default_rng(n)
  x = rng.integers(-4, 5, (3, 7, n)).astype(np.float32)  # many exact ties
  x[0, 0, :] = -np.inf
  x[1, 2, 5:] = -np.inf
  v1, i1 = reference.exact_top_k(jnp.asarray(x), k)
  v2, i2 = jax.lax.top_k(jnp.asarray(x), k)
  np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))
  finite = np.isfinite(np.asarray(v2))
  np.testing.assert_array_equal(np.asarray(i1)[finite], np.asarray(i2)[finite])


def test_index_topk_many_blocks_matches_oracle():
  """More than 512 blocks: the two-stage top-k path of the selection."""
  rng = np.random.default_rng(40)
  b, t, s, g, di, bs, k = 1, 3, 1200, 2, 4, 2, 6
  q_idx = rng.integers(-2, 3, (b, t, g, di)).astype(np.float32)
  k_idx = rng.integers(-2, 3, (b, s, di)).astype(np.float32)
  ids = msa_jax.index_topk(jnp.asarray(q_idx), jnp.asarray(k_idx), block_size=bs, topk=k,
                           implementation="xla")
  pos = (s - t + np.arange(t))[None]
  want = oracle.index_topk(q_idx, k_idx, bs, k, pos, np.array([s]))
  assert oracle.same_sets(ids, want)
