"""The Mosaic GPU (Hopper TMA + wgmma) index top-k kernel under the Mosaic GPU interpreter.

As ``test_sparse_mgpu.py``: the interpreter runs the producer and compute warpgroups as
threads, checks barrier phases, detects races and fills fresh memory with NaN; on a GPU
(``JAX_PLATFORMS=cuda``) the same tests run the compiled kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msa_jax
from msa_jax.ops.index_topk import gpu_mosaic as kernel
from msa_jax import tuning
from tests import cases as C
from tests import oracle
from tests.ops.sparse_attention.test_gpu_mosaic import gpu_interpret, interpreted, InterpretGPUParams

pytestmark = pytest.mark.skipif(
    (gpu_interpret is None or InterpretGPUParams is None) and jax.default_backend() != "gpu",
    reason="Mosaic GPU interpret mode not in this jax")


def _inputs(seed, *, batch, q_len, kv_len, groups, index_dim=64, kv_lengths=None,
            first_position=None, ties=False, dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  if ties:  # small integers: every score exact, many equal block maxima
    q_idx = rng.integers(-2, 3, (batch, q_len, groups, index_dim))
    k_idx = rng.integers(-2, 3, (batch, kv_len, index_dim))
  else:
    q_idx = rng.standard_normal((batch, q_len, groups, index_dim))
    k_idx = rng.standard_normal((batch, kv_len, index_dim))
  kvl = np.array(kv_lengths or (kv_len,) * batch, np.int32)
  first = np.array(first_position) if first_position else kvl - q_len
  pos = (first[:, None] + np.arange(q_len)[None]).astype(np.int32)
  return (jnp.asarray(q_idx, dtype), jnp.asarray(k_idx, dtype), jnp.asarray(pos),
          jnp.asarray(kvl))


CASES = {
    # Causal prefill: 48 queries x 4 groups = 192 rows (two CTAs, the second half padding),
    # a partial last block.
    "prefill": dict(batch=1, q_len=48, kv_len=300, groups=4),
    # Chunked prefill, ragged lengths: sequence 1's last queries see only up to its length.
    "chunked_ragged": dict(batch=2, q_len=40, kv_len=448, groups=2, kv_lengths=(448, 330),
                           first_position=(400, 300)),
    # Exact ties everywhere: the lower block id wins.
    "ties": dict(batch=1, q_len=64, kv_len=512, groups=2, ties=True),
    # More slots than visible blocks for the early queries: -1 padding.
    "topk_exceeds_blocks": dict(batch=1, q_len=32, kv_len=200, groups=4),
    # Decode: one query per sequence, ragged caches (sequence 1's ends inside a block, and 4
    # ranges of 2 blocks over its 7: the last range sees nothing).
    "decode": dict(batch=3, q_len=1, kv_len=448, groups=4, kv_lengths=(448, 300, 64)),
}


@pytest.mark.parametrize("name,topk,block_size,stages,splits", [
    ("prefill", 3, 64, 2, 1), ("chunked_ragged", 4, 64, 3, 1), ("ties", 5, 64, 4, 1),
    ("topk_exceeds_blocks", 6, 64, 2, 1), ("prefill", 2, 128, 2, 1),
    # Split-K (decode): key ranges over several CTAs, candidates merged in XLA; ties across
    # ranges, ranges past some rows' visible keys, and an empty last range.
    ("ties", 5, 64, 2, 3), ("chunked_ragged", 4, 64, 2, 3), ("decode", 4, 64, 2, 4)])
def test_selection_matches_oracle(name, topk, block_size, stages, splits):
  q_idx, k_idx, pos, kvl = _inputs(7, **CASES[name])
  with interpreted() as params:
    ids = kernel.fused_topk(q_idx, k_idx, pos, kvl, block_size=block_size, topk=topk,
                            num_stages=stages, splits=splits, interpret=params)
    ids.block_until_ready()
  assert ids.shape == (*q_idx.shape[:3], topk) and ids.dtype == jnp.int32
  f32 = lambda x: np.asarray(x.astype(jnp.float32))
  want = oracle.index_topk(f32(q_idx), f32(k_idx), block_size, topk, np.asarray(pos),
                           np.asarray(kvl))
  assert oracle.same_sets(ids, want)
  # Valid entries first, by descending score (the order the running top-k keeps).
  got = np.asarray(ids)
  assert np.all((got[..., 1:] == -1) | (got[..., :-1] != -1))


def test_api_dispatch(monkeypatch):
  """``"selection": "mosaic"`` in the index tuning section routes ``index_topk`` here, and
  inputs the kernel does not support fall back to the Triton kernel."""
  q_idx, k_idx, pos, kvl = _inputs(8, **CASES["prefill"])
  calls = []
  run = kernel.fused_topk
  monkeypatch.setattr(kernel, "fused_topk", lambda *a, **kw: calls.append(kw) or run(*a, **kw))
  with tuning.override("index", selection="mosaic"), interpreted() as params:
    ids = msa_jax.index_topk(q_idx, k_idx, block_size=64, topk=3, implementation="pallas_gpu",
                             interpret=params)
    ids.block_until_ready()
  assert len(calls) == 1
  f32 = lambda x: np.asarray(x.astype(jnp.float32))
  want = oracle.index_topk(f32(q_idx), f32(k_idx), 64, 3, np.asarray(pos), np.asarray(kvl))
  assert oracle.same_sets(ids, want)
  with tuning.override("index", selection="mosaic", blocks_per_tile=2):  # f32: Triton
    ids = msa_jax.index_topk(q_idx.astype(jnp.float32), k_idx.astype(jnp.float32),
                             block_size=64, topk=3, implementation="pallas_gpu", interpret=True)
  assert len(calls) == 1 and oracle.same_sets(ids, want)


def test_supports_and_errors():
  q = jnp.zeros((1, 8, 4, 128), jnp.bfloat16)
  k = jnp.zeros((1, 256, 128), jnp.bfloat16)
  assert kernel.supports(q, k, 128, 16)
  assert not kernel.supports(q.astype(jnp.float32), k.astype(jnp.float32), 128, 16)
  assert not kernel.supports(q, k, 32, 16)  # block smaller than a swizzled tile row
  assert not kernel.supports(q, k, 128, 17)  # more entries than registers hold
  with pytest.raises(ValueError, match="does not support"):
    kernel.fused_topk(q, k, jnp.zeros((1, 8), jnp.int32), jnp.array([256]), block_size=32,
                      topk=4)
  with pytest.raises(ValueError, match="shared memory"):
    kernel.fused_topk(q, k, jnp.zeros((1, 8), jnp.int32), jnp.array([256]), block_size=256,
                      topk=4, num_stages=8)


@pytest.mark.parametrize("b,t,splits", [(1, 256, 1), (8, 1, 16)])  # prefill, decode
def test_lowers_for_hopper_at_m3_shapes(b, t, splits):
  """Pallas -> Mosaic GPU lowering at M3 index shapes (Di 128, Bk 128, top 16), on CPU
  through ``jax.export`` for CUDA."""
  s_len, g, di = 4096, 4, 128
  shape = C.spec
  fn = lambda qi, ki, pos, kvl: kernel.fused_topk(qi, ki, pos, kvl, block_size=128, topk=16,
                                                  splits=splits)
  assert C.lowers_to_mosaic_gpu(
      fn,
      shape(b, t, g, di), shape(b, s_len, di), shape(b, t, dtype=jnp.int32),
      shape(b, dtype=jnp.int32))


@pytest.mark.parametrize("ties", [True, False])
def test_fp8_selection_matches_reference_on_rounded_inputs(ties):
  """FP8 scoring (``score_dtype="float8_e4m3fn"``) through the API: the Mosaic kernel's FP8
  GEMM with per-block key scales selects what the XLA reference selects from the FP8-rounded
  inputs. Small integers are exact in E4M3 with power-of-two scales (every score exact, many
  ties); normal data checks the scales (keys of different magnitudes)."""
  q_idx, k_idx, pos, kvl = _inputs(9, batch=2, q_len=40, kv_len=448, groups=2,
                                   index_dim=128, kv_lengths=(448, 330),
                                   first_position=(400, 300), ties=ties)
  if not ties:  # keys of very different norms: their scales matter
    k_idx = k_idx * jnp.exp2(jnp.arange(448) % 7 - 3.0)[None, :, None].astype(k_idx.dtype)
  with tuning.override("index", selection="mosaic"), interpreted() as params:
    ids = msa_jax.index_topk(q_idx, k_idx, block_size=64, topk=4, implementation="pallas_gpu",
                             q_positions=pos, kv_lengths=kvl, interpret=params,
                             score_dtype="float8_e4m3fn")
    ids.block_until_ready()
  want = msa_jax.index_topk(q_idx, k_idx, block_size=64, topk=4, implementation="xla",
                            q_positions=pos, kv_lengths=kvl, score_dtype="float8_e4m3fn")
  assert oracle.same_sets(ids, want)
  if ties:  # and the exact oracle on the rounded values agrees
    from msa_jax import reference
    f64 = lambda x: np.asarray(x, np.float64)
    k_round = reference.fp8_round_blocks(k_idx, 64)
    assert oracle.same_sets(ids, oracle.index_topk(f64(reference.fp8_round(q_idx)),
                                                   f64(k_round), 64, 4, np.asarray(pos),
                                                   np.asarray(kvl)))


def test_fp8_rounding():
  from msa_jax import reference
  x = jnp.asarray(np.random.default_rng(3).standard_normal((5, 128)) * [[1e-3], [1], [7], [300],
                                                                         [0]], jnp.float32)
  x8, scale = reference.fp8_per_token(x)
  assert x8.dtype == jnp.float8_e4m3fn and scale.shape == (5,)
  s = np.asarray(scale)
  assert np.all(np.log2(s) == np.round(np.log2(s)))  # powers of two
  amax = np.abs(np.asarray(x)).max(-1)
  assert np.all(amax[:4] / s[:4] <= reference.FP8_MAX) and np.all(amax[:4] / s[:4] > 224)
  err = np.abs(np.asarray(reference.fp8_round(x)) - np.asarray(x))
  assert np.all(err <= np.abs(np.asarray(x)) * 2**-4 + s[:, None] * 2**-9)  # 3 mantissa bits
  # A block's scale comes from its finite keys: a NaN key changes no other key's rounding.
  k = jnp.asarray(np.random.default_rng(4).standard_normal((2, 40, 8)), jnp.float32)
  want = reference.fp8_round_blocks(k, 16)
  got = reference.fp8_round_blocks(k.at[1, 5, 3].set(jnp.nan), 16)
  keep = np.ones((2, 40), bool)
  keep[1, 5] = False
  np.testing.assert_array_equal(np.asarray(got)[keep], np.asarray(want)[keep])
  assert np.isnan(np.asarray(got)[1, 5, 3])
  with pytest.raises(ValueError, match="score_dtype"):
    msa_jax.index_topk(jnp.ones((1, 2, 1, 8)), jnp.ones((1, 4, 8)), block_size=2, topk=1,
                       score_dtype="int8")


def test_fp8_lowers_for_hopper_at_m3_shapes():
  from msa_jax import reference
  b, t, s_len, g, di = 1, 256, 2048, 4, 128

  def fn(qi, ki, pos, kvl):
    q8, _ = reference.fp8_per_token(qi)
    k8, block_scale = reference.fp8_per_block(ki, 128)
    return kernel.fused_topk(q8, k8, pos, kvl, block_size=128, topk=16,
                             k_block_scale=block_scale)

  shape = C.spec
  assert C.lowers_to_mosaic_gpu(
      fn,
      shape(b, t, g, di), shape(b, s_len, di), shape(b, t, dtype=jnp.int32),
      shape(b, dtype=jnp.int32))


def test_fp8_block_scales_match_reference():
  """One FP8 scale per key block (``k_block_scale``), applied to the block max: the selection
  the reference makes from the block-rounded keys. Blocks of very different magnitudes."""
  from msa_jax import reference
  q_idx, k_idx, pos, kvl = _inputs(10, batch=1, q_len=48, kv_len=448, groups=4,
                                   index_dim=128, ties=True)
  k_idx = k_idx * jnp.exp2(jnp.arange(448) // 64 % 3 - 1.0)[None, :, None].astype(k_idx.dtype)
  q8, _ = reference.fp8_per_token(q_idx)
  k8, block_scale = reference.fp8_per_block(k_idx, 64)
  assert block_scale.shape == (1, 7)
  with interpreted() as params:
    ids = kernel.fused_topk(q8, k8, pos, kvl, block_size=64, topk=4, k_block_scale=block_scale,
                            interpret=params)
    ids.block_until_ready()
  k_round = (k8.astype(jnp.float32).reshape(1, 7, 64, 128) * block_scale[..., None, None])
  f64 = lambda x: np.asarray(x, np.float64)
  want = oracle.index_topk(f64(reference.fp8_round(q_idx)), f64(k_round.reshape(1, 448, 128)),
                           64, 4, np.asarray(pos), np.asarray(kvl))
  assert oracle.same_sets(ids, want)


def test_api_decode_dispatch_splits_the_keys(monkeypatch):
  """``"selection": "mosaic"`` in the decode section: the kernel runs split-K (key ranges
  over several CTAs, enough to reach ``min_programs``) and the merged selection is the
  oracle's."""
  q_idx, k_idx, pos, kvl = _inputs(12, **CASES["decode"])
  calls = []
  run = kernel.fused_topk
  monkeypatch.setattr(kernel, "fused_topk", lambda *a, **kw: calls.append(kw) or run(*a, **kw))
  with tuning.override("index_decode", selection="mosaic", min_programs=8), \
      interpreted() as params:
    ids = msa_jax.index_topk(q_idx, k_idx, block_size=64, topk=4, implementation="pallas_gpu",
                             kv_lengths=kvl, interpret=params)
    ids.block_until_ready()
  assert len(calls) == 1 and calls[0]["splits"] == 3  # 8 programs over 3 sequences' tiles
  f32 = lambda x: np.asarray(x.astype(jnp.float32))
  want = oracle.index_topk(f32(q_idx), f32(k_idx), 64, 4, np.asarray(pos), np.asarray(kvl))
  assert oracle.same_sets(ids, want)
