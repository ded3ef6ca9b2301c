"""msa_jax.full_attention: dense attention with MSA's visibility rule in bounded memory.

Every path against the float64 oracle (dense masked attention) on fresh random data: ragged
prefill with padding queries, chunked prefill, decode and speculative decode, caches longer
than what they hold; NaN in cache slots past the lengths must not reach an output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msa_jax
from msa_jax import full as fa
from msa_jax.ops.full_attention import gpu_cudnn
from tests import oracle


def _oracle(q, k, v, pos, kv_len):
  s = k.shape[1]
  ids = np.zeros((q.shape[0], q.shape[1], k.shape[2], 1), np.int64)
  out, _ = oracle.sparse_attention(q, k, v, ids, s, 1 / np.sqrt(q.shape[-1]), np.asarray(pos),
                                   np.asarray(kv_len))
  return out


def _inputs(seed, b, t, s, hq, g, d=32, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
  k = jax.random.normal(ks[1], (b, s, g, d), dtype)
  v = jax.random.normal(ks[2], (b, s, g, d), dtype)
  return q, k, v


def _layout(first, n, t):
  """Positions of a model step: sequence b's n[b] queries from first[b], then padding."""
  pos = np.full((len(first), t), -1, np.int32)
  for b, (f, m) in enumerate(zip(first, n)):
    pos[b, :m] = f + np.arange(m)
  return pos, np.asarray([f + m for f, m in zip(first, n)], np.int32)


# (name, batch, T, S, Hq, G, first position per sequence, queries per sequence)
LAYOUTS = [
    ("prefill_ragged", 3, 70, 80, 4, 2, (0, 0, 0), (70, 41, 1)),
    ("chunked_prefill", 2, 48, 200, 8, 2, (100, 37), (48, 20)),
    ("decode", 3, 1, 150, 16, 1, (149, 40, 0), (1, 1, 1)),
    ("speculative", 2, 8, 130, 8, 4, (100, 3), (8, 5)),
    ("idle_row", 2, 16, 64, 4, 2, (10, 30), (16, 0)),
]


def _nan_past_lengths(k, v, kv_len):
  live = np.arange(k.shape[1])[None, :] < np.asarray(kv_len)[:, None]
  poison = lambda x: jnp.where(live[:, :, None, None], x, jnp.nan)
  return poison(k), poison(v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name,b,t,s,hq,g,first,n", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_xla_matches_oracle(name, b, t, s, hq, g, first, n, dtype):
  q, k, v = _inputs(hash(name) % 1000, b, t, s, hq, g, dtype=dtype)
  pos, kv_len = _layout(first, n, t)
  k, v = _nan_past_lengths(k, v, kv_len)
  # Small tiles: several query chunks and key chunks, neither dividing T or S.
  out = msa_jax.full_attention(q, k, v, q_positions=pos, kv_lengths=kv_len,
                               implementation="xla", q_chunk=16, k_chunk=24)
  want = _oracle(q, k, v, pos, kv_len)
  out = np.asarray(out, np.float64)
  assert np.isfinite(out).all()
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(out, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name,b,t,s,hq,g,first,n", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_tpu_flash_kernel_matches_oracle(name, b, t, s, hq, g, first, n, dtype):
  """The Pallas TPU flash kernel (interpret mode) with small tiles: several query and key
  tiles, skipped key tiles, padding rows; NaN past the lengths must not leak."""
  from msa_jax.ops.full_attention import tpu as flash_attention
  q, k, v = _inputs(hash(name) % 991, b, t, s, hq, g, dtype=dtype)
  pos, kv_len = _layout(first, n, t)
  k, v = _nan_past_lengths(k, v, kv_len)
  out = flash_attention.flash_attention(q, k, v, jnp.asarray(pos), jnp.asarray(kv_len),
                                        scale=1 / np.sqrt(q.shape[-1]), rows=16, keys=128,
                                        interpret=True)
  want = _oracle(q, k, v, pos, kv_len)
  out = np.asarray(out, np.float64)
  assert np.isfinite(out).all()
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(out, want, atol=tol, rtol=tol)


def test_tpu_flash_kernel_lowers_for_tpu():
  """The Pallas -> Mosaic TPU lowering (block shapes, scalar prefetch) at M3's shapes, on CPU:
  a 8K prefill chunk, a 128K-cache decode step, float32 with odd sizes."""
  from jax import export
  from jax._src import mesh as mesh_lib
  from msa_jax.ops.full_attention import tpu as flash_attention
  try:
    device = mesh_lib.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  except TypeError:
    pytest.skip("this jax's AbstractDevice cannot name a TPU")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  fn = jax.jit(lambda q, k, v, p, n: flash_attention.flash_attention(q, k, v, p, n, scale=0.1))
  for b, t, s, hq, g, d, dtype in [(1, 8192, 8192, 64, 4, 128, jnp.bfloat16),
                                   (2, 1, 131072, 64, 4, 128, jnp.bfloat16),
                                   (1, 300, 1000, 16, 4, 64, jnp.float32)]:
    q = jax.ShapeDtypeStruct((b, t, hq, d), dtype)
    kv = jax.ShapeDtypeStruct((b, s, g, d), dtype)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    with jax.sharding.use_abstract_mesh(mesh):
      exported = export.export(fn, platforms=["tpu"])(q, kv, kv, ints(b, t), ints(b))
    assert b"tpu_custom_call" in exported.mlir_module_serialized


@pytest.mark.parametrize("name,b,t,s,hq,g,first,n",
                         [c for c in LAYOUTS if c[2] <= fa.MAX_DECODE_QUERIES],
                         ids=[c[0] for c in LAYOUTS if c[2] <= fa.MAX_DECODE_QUERIES])
def test_gpu_decode_kernel_matches_oracle(name, b, t, s, hq, g, first, n):
  """The split-K decode kernel over every block (interpret mode), S not a multiple of 128."""
  q, k, v = _inputs(hash(name) % 997, b, t, s, hq, g)
  pos, kv_len = _layout(first, n, t)
  k, v = _nan_past_lengths(k, v, kv_len)
  out = msa_jax.full_attention(q, k, v, q_positions=pos, kv_lengths=kv_len,
                               implementation="pallas_gpu", interpret=True)
  want = _oracle(q, k, v, pos, kv_len)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu", "pallas_tpu"])
def test_paged_decode_matches_contiguous(implementation):
  """Decode over shuffled pages without gathering them = the contiguous result."""
  b, t, hq, g, d, bk, max_pages = 2, 2, 8, 2, 32, 16, 6
  lengths = np.array([81, 35], np.int32)
  q, k, v = _inputs(5, b, t, max_pages * bk, hq, g, d)
  num_pages = b * max_pages + 3
  perm = np.random.default_rng(0).permutation(num_pages)[:b * max_pages]
  table = perm.reshape(b, max_pages).astype(np.int32)
  k_pages = jnp.full((num_pages, bk, g, d), jnp.nan).at[table.reshape(-1)].set(
      k.reshape(b * max_pages, bk, g, d))
  v_pages = jnp.full((num_pages, bk, g, d), jnp.nan).at[table.reshape(-1)].set(
      v.reshape(b * max_pages, bk, g, d))
  live = np.arange(max_pages * bk)[None] < lengths[:, None]
  k_pages = k_pages.at[table.reshape(-1)].set(
      jnp.where(live[:, :, None, None], k, jnp.nan).reshape(b * max_pages, bk, g, d))
  out = fa.paged_full_attention(q, k_pages, v_pages, table, lengths,
                                implementation=implementation, interpret=True)
  pos = lengths[:, None] - t + np.arange(t)[None]
  want = _oracle(q, k, v, pos, lengths)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu", "pallas_tpu"])
def test_a_nan_value_reaches_only_the_queries_that_see_it(implementation):
  """A NaN value at key 50 (inside kv_lengths): queries at positions >= 50 get NaN, earlier
  ones are exact (no 0 * NaN through P @ V); a +Inf key makes its viewers NaN, not empty."""
  q, k, v = _inputs(11, 1, 12, 80, 4, 2)
  pos, kv_len = _layout((44,), (12,), 12)  # positions 44..55, kv_len 56
  got = msa_jax.full_attention(q, k, v.at[:, 50].set(jnp.nan), q_positions=pos,
                               kv_lengths=kv_len, implementation=implementation,
                               interpret=True, q_chunk=8, k_chunk=16)
  want = _oracle(q, k, v, pos, kv_len)
  np.testing.assert_allclose(np.asarray(got)[:, :6], want[:, :6], atol=2e-5, rtol=2e-5)
  assert np.isnan(np.asarray(got)[:, 6:]).any(axis=(2, 3)).all()
  got = msa_jax.full_attention(q, k.at[:, 52].set(jnp.inf), v, q_positions=pos,
                               kv_lengths=kv_len, implementation=implementation,
                               interpret=True, q_chunk=8, k_chunk=16)
  np.testing.assert_allclose(np.asarray(got)[:, :8], want[:, :8], atol=2e-5, rtol=2e-5)
  assert np.isnan(np.asarray(got)[:, 8:]).any(axis=(2, 3)).all()


def test_bottom_right_layout_predicate():
  pos, kv_len = _layout((5, 0), (4, 2), 6)
  assert bool(gpu_cudnn.bottom_right(jnp.asarray(pos), jnp.asarray(kv_len)))
  bad = pos.copy()
  bad[0, 1] = 9  # a gap
  assert not bool(gpu_cudnn.bottom_right(jnp.asarray(bad), jnp.asarray(kv_len)))
  early = pos.copy()
  early[1] = [-1, 0, 1, -1, -1, -1]  # padding before the queries
  assert not bool(gpu_cudnn.bottom_right(jnp.asarray(early), jnp.asarray(kv_len)))


def test_xla_path_never_builds_t_by_s_scores():
  """Compiled temporaries stay far below one [Hq, T, S] float32 score matrix."""
  b, t, s, hq, g, d = 1, 4096, 4096, 8, 2, 64
  q = jax.ShapeDtypeStruct((b, t, hq, d), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, s, g, d), jnp.float32)
  fn = jax.jit(lambda q, k, v: msa_jax.full_attention(q, k, v, implementation="xla"))
  stats = fn.lower(q, kv, kv).compile().memory_analysis()
  scores = b * hq * t * s * 4
  assert stats.temp_size_in_bytes < scores / 8, (stats.temp_size_in_bytes, scores)


def test_validation():
  q, k, v = _inputs(0, 1, 4, 8, 2, 1)
  with pytest.raises(ValueError, match="q_chunk"):
    msa_jax.full_attention(q, k, v, q_chunk=0)
  with pytest.raises(ValueError, match="kv_lengths"):
    msa_jax.full_attention(q, k, v, kv_lengths=np.array([9], np.int32))
  with pytest.raises(ValueError, match="kv_lengths .* is required with page_table"):
    pages = jnp.zeros((4, 16, 1, 32))
    msa_jax.full_attention(jnp.zeros((1, 17, 2, 32)), pages, pages,
                           page_table=jnp.zeros((1, 4), jnp.int32))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
@pytest.mark.parametrize("name,b,t,s,hq,g,first,n",
                         [c for c in LAYOUTS if c[2] > fa.MAX_DECODE_QUERIES],
                         ids=[c[0] for c in LAYOUTS if c[2] > fa.MAX_DECODE_QUERIES])
def test_cudnn_matches_oracle(name, b, t, s, hq, g, first, n):
  q, k, v = _inputs(hash(name) % 991, b, t, s, hq, g, d=64, dtype=jnp.bfloat16)
  pos, kv_len = _layout(first, n, t)
  out = msa_jax.full_attention(q, k, v, q_positions=pos, kv_lengths=kv_len,
                               implementation="pallas_gpu")
  want = _oracle(q, k, v, pos, kv_len)
  out = np.asarray(out, np.float64)
  err = np.linalg.norm(out - want) / np.linalg.norm(want)
  assert err < 1e-2, err
