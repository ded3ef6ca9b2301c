"""FP8 index scoring (``score_dtype="float8_e4m3fn"``) through the public API, the paged
decode API and the model: the selection is the one made from the FP8-rounded index inputs
(the Mosaic GPU kernel's FP8 GEMM is tested in ``test_index_mgpu.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import msa_jax
import models
from msa_jax.ops.index_topk import paths as index_paths
from msa_jax import reference
from tests import cases as C
from tests.test_paged import make_paged

FP8 = "float8_e4m3fn"


def test_msa_attention_selects_from_rounded_inputs():
  case = C.CASES["chunked_prefill_gqa8"]
  x = C.make_inputs(case, jnp.float32, seed=3)
  kw = dict(block_size=case.block_size, topk=case.topk, return_indices=True,
            implementation="xla", **C.position_kwargs(x, always=True))
  out, ids = msa_jax.msa_attention(x["q"], x["k"], x["v"], x["q_idx"], x["k_idx"],
                                   score_dtype=FP8, **kw)
  k_round = reference.fp8_round_blocks(x["k_idx"], case.block_size)
  want_out, want_ids = msa_jax.msa_attention(x["q"], x["k"], x["v"], index_paths.fp8_rounded(x["q_idx"]),
                                             k_round, **kw)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
  # The Pallas GPU path (interpret; on CPU the Triton kernels) selects the same.
  gpu_ids = msa_jax.index_topk(x["q_idx"], x["k_idx"], block_size=case.block_size,
                               topk=case.topk, implementation="pallas_gpu", interpret=True,
                               score_dtype=FP8, **C.position_kwargs(x, always=True))
  assert np.array_equal(np.sort(np.asarray(gpu_ids), -1), np.sort(np.asarray(ids), -1))


def test_paged_decode_selects_as_contiguous():
  """On a paged cache (shuffled pages, stale huge keys past the lengths) FP8 scoring rounds
  each page as the contiguous path rounds each block: the same selection."""
  p = make_paged(batch=3, q_len=2, lengths=(75, 40, 120), q_heads=4, groups=2,
                 dtype=jnp.float32, seed=4)
  cache = p["cache"]._replace(lengths=p["lengths"])
  ids = msa_jax.paged_index_topk(p["q_idx"], cache.index_pages, cache.page_table, cache.lengths,
                                 block_size=p["block_size"], topk=p["topk"],
                                 implementation="xla", score_dtype=FP8)
  want = msa_jax.index_topk(p["q_idx"], p["k_idx"], block_size=p["block_size"], topk=p["topk"],
                            kv_lengths=p["lengths"], implementation="xla", score_dtype=FP8)
  np.testing.assert_array_equal(np.sort(np.asarray(ids), -1), np.sort(np.asarray(want), -1))
  out = msa_jax.paged_msa_decode(p["q"], p["q_idx"], *cache, block_size=p["block_size"],
                                 topk=p["topk"], implementation="xla", score_dtype=FP8)
  assert np.isfinite(np.asarray(out)).all()


def test_model_knob_reaches_prefill_and_decode():
  """``index_score_dtype`` changes the tiny model's MSA layers (selection active at 96
  tokens), and its incremental decode still matches its own full forward."""
  config = models.preset("tiny").replace(index_score_dtype=FP8)
  base = models.MiniMaxM3(models.preset("tiny"), rngs=nnx.Rngs(0))
  fp8 = models.MiniMaxM3(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 96), 0, config.vocab_size)
  forward = jax.jit(lambda m, tok: m.forward(tok))
  full = forward(fp8, tokens)
  assert not np.allclose(np.asarray(full), np.asarray(forward(base, tokens)), atol=1e-6)
  step = jax.jit(lambda m, tok, c: m(tok, c))
  cache = models.init_cache(config, 2, 96)
  pieces = []
  for start, stop in [(0, 50), (50, 51), (51, 52), (52, 96)]:
    logits, cache = step(fp8, tokens[:, start:stop], cache)
    pieces.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, axis=1)), np.asarray(full),
                             atol=2e-4)


def test_bad_score_dtype():
  with pytest.raises(ValueError, match="index_score_dtype"):
    models.preset("tiny").replace(index_score_dtype="int8")
  with pytest.raises(ValueError, match="score_dtype"):
    x = jnp.ones((1, 4, 1, 8))
    msa_jax.msa_attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 1, 8)), jnp.ones((1, 4, 1, 8)),
                          x, jnp.ones((1, 4, 8)), block_size=2, topk=1, score_dtype="bfloat8")
