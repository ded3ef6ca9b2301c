"""Public API: defaults, dispatch, and the ValueErrors raised on bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msa_jax
from msa_jax import checks
from tests import cases as C

B, T, S, HQ, G, D, DI, BS = 2, 8, 64, 8, 2, 16, 8, 16


def _inputs():
  r = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
  return dict(q=f(B, T, HQ, D), k=f(B, S, G, D), v=f(B, S, G, D), q_idx=f(B, T, G, DI),
              k_idx=f(B, S, DI))


def _ids(value=0, topk=2):
  return jnp.full((B, T, G, topk), value, jnp.int32)


X = _inputs()
SPARSE_CASES = {
    "q rank": (dict(q=X["q"][0]), "q must be a rank-4"),
    "k rank": (dict(k=X["k"][..., 0]), "k must be a rank-4"),
    "heads": (dict(q=jnp.ones((B, T, 7, D))), r"q_heads \(7\) must be a multiple"),
    "batch": (dict(k=X["k"][:1], v=X["v"][:1]), "batch mismatch"),
    "head_dim": (dict(k=X["k"][..., :8], v=X["v"][..., :8]), "head_dim"),
    "v shape": (dict(v=X["v"][:, :10]), "v must match k"),
    "dtype mix": (dict(k=X["k"].astype(jnp.bfloat16)), "share one dtype"),
    "int q": (dict(q=X["q"].astype(jnp.int32)), "q must be a floating-point"),
    "ids rank": (dict(block_indices=_ids()[0]), "block_indices must be a rank-4"),
    "ids groups": (dict(block_indices=jnp.zeros((B, T, 3, 2), jnp.int32)),
                   "block_indices must have shape"),
    "ids float": (dict(block_indices=_ids().astype(jnp.float32)),
                  "block_indices must be an integer"),
    "ids range": (dict(block_indices=_ids(S // BS)), r"block id in \[0, 4\)"),
    "ids below -1": (dict(block_indices=_ids(-2)), "block_indices must be -1"),
    "block_size 0": (dict(block_size=0), "block_size must be an integer >= 1"),
    "block_size float": (dict(block_size=16.0), "block_size must be an integer"),
    "positions shape": (dict(q_positions=jnp.zeros((B, T + 1), jnp.int32)),
                        r"q_positions must have shape \[2, 8\]"),
    "positions float": (dict(q_positions=jnp.zeros((B, T))), "q_positions must be an integer"),
    "lengths shape": (dict(kv_lengths=jnp.zeros((B + 1,), jnp.int32)),
                      r"kv_lengths must have shape \[2\]"),
    "lengths range": (dict(kv_lengths=jnp.array([S + 1, 3], jnp.int32)),
                      r"kv_lengths must lie in \[0, 64\]"),
    "implementation": (dict(implementation="cuda"), "implementation must be one of"),
    "scale": (dict(scale=-1.0), "scale must be a finite positive"),
}


@pytest.mark.parametrize("name", list(SPARSE_CASES))
def test_sparse_attention_validation(name):
  override, msg = SPARSE_CASES[name]
  args = dict(q=X["q"], k=X["k"], v=X["v"], block_indices=_ids())
  kwargs = dict(block_size=BS)
  for key_, val in override.items():
    (args if key_ in args else kwargs)[key_] = val
  with pytest.raises(ValueError, match=msg):
    msa_jax.sparse_attention(*args.values(), **kwargs)


MSA_CASES = {
    "q_idx groups": (dict(q_idx=jnp.ones((B, T, G + 1, DI))), "one index head per KV group"),
    "q_idx rank": (dict(q_idx=jnp.ones((B, T, DI))), "q_idx must be a rank-4"),
    "k_idx rank": (dict(k_idx=jnp.ones((B, S, 1, DI))), "k_idx must be a rank-3"),
    "k_idx len": (dict(k_idx=jnp.ones((B, S - 1, DI))), "k_idx must have kv_len 64"),
    "q_idx len": (dict(q_idx=jnp.ones((B, T + 1, G, DI))), "q_idx must have q_len 8"),
    "q_idx batch": (dict(q_idx=jnp.ones((B + 1, T, G, DI))), "batch mismatch"),
    "index dim": (dict(k_idx=jnp.ones((B, S, DI + 1))), "k_idx must have index_dim"),
    "topk 0": (dict(topk=0), "topk must be an integer >= 1"),
    "topk float": (dict(topk=2.5), "topk must be an integer"),
    "block_size neg": (dict(block_size=-16), "block_size must be an integer >= 1"),
}


@pytest.mark.parametrize("name", list(MSA_CASES))
def test_msa_attention_validation(name):
  override, msg = MSA_CASES[name]
  args = dict(q=X["q"], k=X["k"], v=X["v"], q_idx=X["q_idx"], k_idx=X["k_idx"])
  kwargs = dict(block_size=BS, topk=2)
  for key_, val in override.items():
    (args if key_ in args else kwargs)[key_] = val
  with pytest.raises(ValueError, match=msg):
    msa_jax.msa_attention(*args.values(), **kwargs)


def test_index_topk_validation():
  with pytest.raises(ValueError, match="topk must be"):
    msa_jax.index_topk(X["q_idx"], X["k_idx"], block_size=BS, topk=0)
  with pytest.raises(ValueError, match="k_idx must be a rank-3"):
    msa_jax.index_topk(X["q_idx"], X["k"], block_size=BS, topk=2)
  with pytest.raises(ValueError, match="q_idx must be a floating-point"):
    msa_jax.index_topk(X["q_idx"].astype(jnp.int32), X["k_idx"], block_size=BS, topk=2)


def test_indexer_kl_loss_validation():
  with pytest.raises(ValueError, match="block_indices must be -1 or a block id"):
    msa_jax.indexer_kl_loss(X["q"], X["k"], X["q_idx"], X["k_idx"], _ids(99), block_size=BS)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_validation_happens_before_kernels(impl, monkeypatch):
  """Bad input fails with ValueError even if the kernels would blow up when traced."""
  from msa_jax.ops.sparse_attention import gpu_triton_paged as gpu_decode
  from msa_jax.ops.sparse_attention import gpu_triton as gpu_sa
  from msa_jax.ops.sparse_attention import tpu as tpu_sa

  def boom(*a, **k):
    raise AssertionError("kernel traced before validation")

  monkeypatch.setattr(gpu_sa, "sparse_attention_partials", boom)
  monkeypatch.setattr(gpu_decode, "paged_sparse_decode", boom)  # few queries (GPU)
  monkeypatch.setattr(tpu_sa, "sparse_attention_partials", boom)
  with pytest.raises(ValueError, match="block id"):
    msa_jax.sparse_attention(X["q"], X["k"], X["v"], _ids(7), block_size=BS,
                             implementation=impl, interpret=True)
  with pytest.raises(AssertionError, match="kernel traced"):  # the patch is really in the path
    msa_jax.sparse_attention(X["q"], X["k"], X["v"], _ids(1), block_size=BS,
                             implementation=impl, interpret=True)


def test_out_of_range_ids_under_jit_are_ignored():
  """Under jit ids cannot be checked; out-of-range ids then count as -1."""
  good = _ids(1).at[..., 1].set(-1)
  bad = _ids(1).at[..., 1].set(S // BS + 3)
  f = jax.jit(lambda ids: msa_jax.sparse_attention(X["q"], X["k"], X["v"], ids, block_size=BS))
  np.testing.assert_allclose(np.asarray(f(bad)), np.asarray(f(good)), rtol=1e-6)


def test_default_implementation_on_cpu():
  assert checks.resolve_implementation(None, False) == "xla"
  assert checks.resolve_implementation(None, True) == "pallas_gpu"
  assert checks.resolve_implementation("pallas_tpu", False) == "pallas_tpu"


def test_defaults_match_explicit_arguments():
  case = C.CASES["chunked_prefill_gqa8"]
  x = C.make_inputs(case, jnp.float32, seed=21)
  ids = C.random_selection(case, x, seed=21)
  a = msa_jax.sparse_attention(x["q"], x["k"], x["v"], ids, block_size=case.block_size,
                               kv_lengths=x["kv_lengths"])
  b = msa_jax.sparse_attention(x["q"], x["k"], x["v"], ids, block_size=case.block_size,
                               kv_lengths=x["kv_lengths"], scale=1 / np.sqrt(case.head_dim),
                               q_positions=x["kv_lengths"][:, None] - case.q_len
                               + jnp.arange(case.q_len)[None], implementation="xla")
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


IMPLS = [("xla", False), ("pallas_gpu", True), ("pallas_tpu", True)]


@pytest.mark.parametrize("impl,interpret", IMPLS)
@pytest.mark.parametrize("b,t", [(0, T), (B, 0)])
def test_empty_batch_or_queries_give_empty_outputs(impl, interpret, b, t):
  x = {name: value[:b] for name, value in X.items()}
  x["q"], x["q_idx"] = x["q"][:, :t], x["q_idx"][:, :t]
  kw = dict(block_size=BS, implementation=impl, interpret=interpret)
  out, ids = msa_jax.msa_attention(*(x[n] for n in ("q", "k", "v", "q_idx", "k_idx")),
                                   topk=2, return_indices=True, **kw)
  assert out.shape == (b, t, HQ, D) and ids.shape == (b, t, G, 2)
  assert msa_jax.index_topk(x["q_idx"], x["k_idx"], topk=2, **kw).shape == (b, t, G, 2)
  out, lse = msa_jax.sparse_attention(x["q"], x["k"], x["v"], jnp.zeros((b, t, G, 2), jnp.int32),
                                      return_lse=True, **kw)
  assert out.shape == (b, t, HQ, D) and lse.shape == (b, t, HQ)
  loss = msa_jax.indexer_kl_loss(x["q"], x["k"], x["q_idx"], x["k_idx"],
                                 jnp.zeros((b, t, G, 2), jnp.int32), **kw)
  assert float(loss) == 0.0
  assert msa_jax.full_attention(x["q"], x["k"], x["v"], implementation=impl,
                                interpret=interpret).shape == (b, t, HQ, D)


def test_no_keys_is_an_error():
  with pytest.raises(ValueError, match="at least one key"):
    msa_jax.msa_attention(X["q"], X["k"][:, :0], X["v"][:, :0], X["q_idx"], X["k_idx"][:, :0])
  with pytest.raises(ValueError, match="at least one key"):
    msa_jax.index_topk(X["q_idx"], X["k_idx"][:, :0])


@pytest.mark.parametrize("impl,interpret", IMPLS)
def test_numpy_integer_statics_are_accepted(impl, interpret):
  args = (X["q"], X["k"], X["v"], X["q_idx"], X["k_idx"])
  want = msa_jax.msa_attention(*args, block_size=BS, topk=2, implementation=impl,
                               interpret=interpret)
  got = msa_jax.msa_attention(*args, block_size=np.int64(BS), topk=np.int32(2),
                              implementation=impl, interpret=interpret)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("impl,interpret", IMPLS)
@pytest.mark.parametrize("t", [24, 4], ids=["prefill", "decode"])
def test_masked_garbage_never_reaches_outputs_and_nan_propagates(impl, interpret, t):
  """NaN/Inf in keys and values past kv_lengths (an unwritten cache), or in a value at a
  causally later key, never reach an output or the indexer KL's gradient; a visible NaN/Inf
  makes exactly the queries that see it NaN, out and (for a logit) LSE alike, on every
  implementation."""
  r = np.random.default_rng(3)
  f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
  q, k, v = f(1, t, HQ, D), f(1, 64, G, D), f(1, 64, G, D)
  q_idx, k_idx = f(1, t, G, DI), f(1, 64, DI)
  first = 40 - t  # queries at first .. 39
  pos, kv_len = jnp.arange(first, 40)[None], jnp.array([40])
  poison = lambda x: x.at[:, 42:].set(jnp.nan).at[:, 41].set(jnp.inf)
  kw = dict(block_size=BS, q_positions=pos, kv_lengths=kv_len, implementation=impl,
            interpret=interpret)
  out = msa_jax.msa_attention(q, poison(k), poison(v), q_idx, poison(k_idx), topk=2, **kw)
  clean = msa_jax.msa_attention(q, k, v, q_idx, k_idx, topk=2, **kw)
  np.testing.assert_allclose(np.asarray(out), np.asarray(clean), rtol=1e-5, atol=1e-6)
  ids = msa_jax.index_topk(q_idx, k_idx, topk=2, **kw)
  wide = dict(kw, kv_lengths=jnp.array([64]))
  # A NaN value at key 38 is seen by the queries at positions 38 and 39 only.
  out = msa_jax.sparse_attention(q, k, v.at[:, 38].set(jnp.nan), ids, **wide)
  finite = np.isfinite(np.asarray(out)).all(axis=(2, 3))[0]
  assert finite[:t - 2].all() and not finite[t - 2:].any()
  # A +Inf key at 37: the queries that see it get NaN out and LSE, not "no keys".
  out, lse = msa_jax.sparse_attention(q, k.at[:, 37].set(jnp.inf), v, ids, return_lse=True,
                                      **wide)
  nan = np.isnan(np.asarray(out)).any(axis=(2, 3))[0]
  assert not nan[:t - 3].any() and nan[t - 3:].all()
  assert np.isnan(np.asarray(lse))[0, t - 3:].all()
  grads = jax.grad(lambda a, b: msa_jax.indexer_kl_loss(q, poison(k), a, b, ids, **kw),
                   argnums=(0, 1))(q_idx, poison(k_idx))
  assert bool(jnp.isfinite(grads[0]).all()) and bool(jnp.isfinite(grads[1][:, :40]).all())
