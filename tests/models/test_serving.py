"""models.serving and the model's inference path: chunked prefill, decode blocks, and the
memory-bounded full attention against the masked attention it replaced (float32, greedy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import msa_jax
from models import serving

TINY = models.preset("tiny")
PROMPTS = [list(range(3, 80)), [5, 17, 42], list(range(100, 141))]  # 77 > k*Bk = 32 tokens


@pytest.fixture(scope="module")
def model():
  return models.MiniMaxM3(TINY, rngs=nnx.Rngs(3))


def _masked_full_attention(q, k, v, *, q_positions, kv_lengths, **_):
  """The full-attention layers' attention before msa_jax.full_attention: [T, S] scores."""
  key_pos = jnp.arange(k.shape[1], dtype=jnp.int32)
  mask = ((key_pos[None, None, :] <= q_positions[:, :, None])
          & (key_pos[None, None, :] < kv_lengths[:, None, None]))
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


_GENERATORS = {}


def _generator(model, batch, max_len, chunk, block, **kw):
  """Generators are reused across tests (each compiles its two steps once)."""
  key = (id(model), batch, max_len, chunk, block, tuple(sorted(kw.items())))
  if key not in _GENERATORS:
    _GENERATORS[key] = serving.Generator(model, batch=batch, max_len=max_len,
                                         prefill_chunk=chunk, decode_block=block, **kw)
  return _GENERATORS[key]


def _generate(model, prompts, *, chunk, block, new=6, seed=0, stop_ids=(), **kw):
  gen = _generator(model, len(prompts), 96, chunk, block, **kw)
  cache = gen.init_cache()
  logits, cache = gen.prefill(prompts, cache)
  tokens, cache = gen.decode(logits, cache, max_new_tokens=new, seed=seed, stop_ids=stop_ids)
  return logits, tokens, cache


def test_chunked_prefill_and_decode_blocks_match_the_model(model):
  one_call_logits, one_call, _ = _generate(model, PROMPTS, chunk=80, block=1)
  chunked_logits, chunked, cache = _generate(model, PROMPTS, chunk=16, block=4)
  assert chunked.tolist() == one_call.tolist()  # chunked prefill = one call; blocks = steps
  np.testing.assert_allclose(np.asarray(chunked_logits), np.asarray(one_call_logits),
                             atol=2e-5, rtol=2e-5)
  # Greedy: every token is the argmax of the whole sequence's forward at its position.
  for prompt, gen in zip(PROMPTS, chunked.tolist()):
    logits = model.forward(jnp.asarray([prompt + gen]))[0]
    assert np.asarray(logits[len(prompt) - 1:-1].argmax(-1)).tolist() == gen
  # Each row's cache holds its prompt and the tokens fed back (all but the last sampled).
  assert np.asarray(cache.lengths).tolist() == [len(p) + 6 for p in PROMPTS]


def test_full_attention_layers_match_the_masked_path(model, monkeypatch):
  """Ragged prefill, chunked prefill and decode through the model: same logits and tokens
  as with the [T, S]-masked attention the full-attention layers used before."""
  new_logits, new_tokens, _ = _generate(model, PROMPTS, chunk=16, block=4)
  monkeypatch.setattr(msa_jax, "full_attention", _masked_full_attention)
  masked = serving.Generator(model, batch=3, max_len=96, prefill_chunk=16, decode_block=4)
  cache = masked.init_cache()
  old_logits, cache = masked.prefill(PROMPTS, cache)
  old_tokens, _ = masked.decode(old_logits, cache, max_new_tokens=6)
  assert new_tokens.tolist() == old_tokens.tolist()
  np.testing.assert_allclose(np.asarray(new_logits), np.asarray(old_logits), atol=1e-5)


def test_last_only_logits_are_the_last_real_tokens(model):
  tokens = jnp.asarray([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
  num_new = jnp.asarray([5, 3])
  full, _ = model(tokens, models.init_cache(TINY, 2, 8), num_new)
  last, _ = model(tokens, models.init_cache(TINY, 2, 8), num_new, last_only=True)
  np.testing.assert_allclose(np.asarray(last[0]), np.asarray(full[0, 4]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(last[1]), np.asarray(full[1, 2]), atol=1e-6)


def test_sampling_on_device_is_seeded_and_respects_top_p(model):
  prompts = [[5, 6, 7]]
  sampled = lambda seed: _generate(model, prompts, chunk=8, block=4, new=8, seed=seed,
                                   temperature=1.0, top_p=0.9)[1].tolist()
  assert sampled(0) == sampled(0) != sampled(1)
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  drawn = {int(serving.sample(logits, k, 1.0, 0.7)[0]) for k in keys}
  assert drawn == {0, 1}  # top-p 0.7 keeps the two tokens that reach it


def test_stop_ids_end_decoding_early(model):
  prompts = PROMPTS[1:]
  _, free, _ = _generate(model, prompts, chunk=16, block=4, new=12)
  stop = {int(free[0, 1]), int(free[1, 2])}
  _, tokens, _ = _generate(model, prompts, chunk=16, block=4, new=12, stop_ids=stop)
  rows = serving.trim(tokens, stop)
  assert tokens.shape[1] < 12  # every row stopped: no more blocks
  for row, full in zip(rows, free.tolist()):
    assert row[-1] in stop and row == full[:len(row)]


def test_prompt_longer_than_cache_is_refused(model):
  g = serving.Generator(model, batch=1, max_len=10, prefill_chunk=8)
  with pytest.raises(ValueError, match="does not fit"):
    g.prefill([list(range(200))], g.init_cache())


def test_top_k_keeps_only_the_k_most_likely_tokens():
  logits = jnp.log(jnp.asarray([[0.1, 0.4, 0.05, 0.3, 0.15]]))
  keys = jax.random.split(jax.random.PRNGKey(1), 300)
  drawn = lambda **kw: {int(serving.sample(logits, k, 1.0, **kw)[0]) for k in keys}
  assert drawn(top_p=1.0, top_k=2) == {1, 3}
  assert drawn(top_p=1.0, top_k=1) == {1}  # = greedy
  assert drawn(top_p=1.0, top_k=0) == {0, 1, 2, 3, 4}  # no limit
  assert drawn(top_p=0.5, top_k=3) == {1, 3}  # top-k first, then top-p within it
  with pytest.raises(ValueError, match="top_k"):
    serving.sample(logits, keys[0], 1.0, 1.0, top_k=-1)
