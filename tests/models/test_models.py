"""models/: config parsing, modules against straightforward references, caches, sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import msa_jax
import models
from models import config as config_lib
from models import sharding
from models.attention import Attention
from models.moe import MoE

TINY = models.preset("tiny")


def _tokens(b, t, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, TINY.vocab_size)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# ----------------------------------------------------------------------------- config


def test_presets_parse():
  m3 = models.preset("minimax_m3")
  assert (m3.num_layers, m3.hidden_size, m3.num_heads, m3.num_kv_heads) == (60, 6144, 64, 4)
  assert m3.sparse_layers == (False,) * 3 + (True,) * 57 == m3.moe_layers
  assert (m3.rotary_dim, m3.rope_theta, m3.index_topk_blocks) == (64, 5e6, 16)
  assert m3.routed_scaling_factor == 2.0 and m3.num_experts == 128
  paper = models.preset("msa_109b")
  assert (paper.num_layers, paper.hidden_size, sum(paper.moe_layers)) == (41, 3072, 38)
  with pytest.raises(ValueError, match="unknown preset"):
    models.preset("nope")


def _nested_from_flat(flat):
  d = dict(flat)
  n = d["num_hidden_layers"]
  sparse = [t == "minimax_m3_sparse" for t in d.pop("layer_types")]
  d["moe_layer_freq"] = [int(t == "sparse") for t in d.pop("mlp_layer_types")]
  d["sparse_attention_config"] = {
      "use_sparse_attention": True, "sparse_attention_freq": [int(s) for s in sparse],
      "sparse_num_index_heads": d.pop("index_n_heads"), "sparse_index_dim":
      d.pop("index_head_dim"), "sparse_block_size": d.pop("index_block_size"),
      "sparse_topk_blocks": d.pop("index_topk_blocks"), "sparse_local_block": 1}
  d.pop("index_local_blocks")
  rope = d.pop("rope_parameters")
  d["rope_theta"] = rope["rope_theta"]
  d["rotary_dim"] = int(d["head_dim"] * rope["partial_rotary_factor"])
  d["hidden_act"] = "swigluoai"
  assert n == len(sparse)
  return {"text_config": d}


def test_both_config_shapes_agree(tmp_path):
  flat = json.load(open(f"{config_lib.CONFIG_DIR}/tiny.json"))
  nested = _nested_from_flat(flat)
  (tmp_path / "config.json").write_text(json.dumps(nested))
  assert models.from_hf_config(tmp_path) == models.from_hf_config(flat) == TINY


@pytest.mark.parametrize("change,msg", [
    ({"num_attention_heads": 5}, "must be a multiple of num_key_value_heads"),
    ({"index_n_heads": 1}, "sparse_num_index_heads .* must equal num_key_value_heads"),
    ({"layer_types": ["full_attention"]}, "one entry per layer"),
    ({"mlp_layer_types": ["dense", "sparse", "moe"]}, "is not one of"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 2.0}}, "rotary_dim"),
])
def test_config_validation(change, msg):
  flat = json.load(open(f"{config_lib.CONFIG_DIR}/tiny.json"))
  flat.update(change)
  with pytest.raises(ValueError, match=msg):
    models.from_hf_config(flat)


def test_config_missing_field():
  with pytest.raises(ValueError, match="missing the required field 'hidden_size'"):
    models.from_hf_config({"num_hidden_layers": 1, "num_attention_heads": 1,
                           "num_key_value_heads": 1, "vocab_size": 8})


# ----------------------------------------------------------------------------- MoE


def test_moe_ragged_dot_equals_expert_loop():
  moe = MoE(TINY, rngs=nnx.Rngs(3))
  moe.e_score_correction_bias[...] = jax.random.normal(jax.random.PRNGKey(4), (4,)) * 0.3
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 9, TINY.hidden_size))
  got = moe(x)
  c = TINY
  xs = np.asarray(x.reshape(-1, c.hidden_size), np.float64)
  gate = np.asarray(moe.gate[...], np.float64)
  probs = 1 / (1 + np.exp(-(xs @ gate)))
  bias = np.asarray(moe.e_score_correction_bias[...], np.float64)
  want = np.zeros_like(xs)
  w1, w2, w3 = (np.asarray(p[...], np.float64) for p in (moe.w1, moe.w2, moe.w3))
  for n in range(xs.shape[0]):
    chosen = np.argsort(-(probs[n] + bias), kind="stable")[:c.num_experts_per_tok]
    weights = probs[n, chosen] / probs[n, chosen].sum() * c.routed_scaling_factor
    for e, w in zip(chosen, weights):
      g = np.minimum(xs[n] @ w1[e], 7.0)
      u = np.clip(xs[n] @ w3[e], -7.0, 7.0)
      want[n] += w * ((g / (1 + np.exp(-1.702 * g)) * (u + 1)) @ w2[e])
  shared = np.asarray(moe.shared_experts(jnp.asarray(xs, jnp.float32)), np.float64)
  assert _rel(got.reshape(-1, c.hidden_size), want + shared) < 1e-5


def test_router_bias_selects_but_does_not_weight():
  moe = MoE(TINY, rngs=nnx.Rngs(6))
  x = jax.random.normal(jax.random.PRNGKey(7), (16, TINY.hidden_size))
  moe.e_score_correction_bias[...] = jnp.array([10.0, 0.0, 0.0, 10.0])  # force experts 0, 3
  ids, weights = moe.route(x)
  assert np.all(np.sort(np.asarray(ids), -1) == [0, 3])
  probs = jax.nn.sigmoid(x @ moe.gate[...])
  chosen = jnp.take_along_axis(probs, ids, -1)
  np.testing.assert_allclose(np.asarray(weights),
                             np.asarray(chosen / chosen.sum(-1, keepdims=True) * 2.0),
                             rtol=1e-6)


# ----------------------------------------------------------------------------- attention


def _attention_outputs(t, seed):
  attn = Attention(TINY, sparse=True, rngs=nnx.Rngs(seed))
  h = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, t, TINY.hidden_size))
  c = models.init_cache(TINY, 2, t)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  lengths = jnp.full((2,), t, jnp.int32)
  sparse = attn(h, pos, lengths, c.k[1], c.v[1], c.index_k[1])
  attn.sparse = False
  dense = attn(h, pos, lengths, c.k[1], c.v[1], c.index_k[1])
  attn.sparse = True
  return attn, h, sparse, dense


def test_msa_layer_is_dense_within_k_blocks():
  span = TINY.index_block_size * TINY.index_topk_blocks  # 32 tokens
  _, _, sparse, dense = _attention_outputs(span, seed=10)
  assert _rel(sparse[0], dense[0]) < 1e-6


def test_msa_layer_selects_beyond_k_blocks():
  t = 90
  attn, h, sparse, dense = _attention_outputs(t, seed=11)
  assert _rel(sparse[0], dense[0]) > 1e-3  # selection is active
  # Same layer through dense attention with a mask built from the reference selection.
  ik = sparse[3]
  c = TINY
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  from models.layers import rope
  iq = attn.index_q_proj(h).reshape(2, t, c.num_kv_heads, c.index_head_dim)
  iq = rope(attn.index_q_norm(iq), pos, rotary_dim=c.rotary_dim, theta=c.rope_theta)
  ids = msa_jax.index_topk(iq, ik, block_size=c.index_block_size, topk=c.index_topk_blocks,
                           implementation="xla")
  block_of_key = jnp.arange(t) // c.index_block_size
  chosen = jnp.any(ids[..., None] == block_of_key, axis=3)  # [B, T, G, S]
  causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
  mask = jnp.repeat(chosen & causal[None, :, None], c.heads_per_group, axis=2)
  q = rope(attn.q_norm(attn.q_proj(h).reshape(2, t, c.num_heads, c.head_dim)), pos,
           rotary_dim=c.rotary_dim, theta=c.rope_theta)
  out = jax.nn.dot_product_attention(q, sparse[1], sparse[2],
                                     mask=jnp.moveaxis(mask, 2, 1))
  want = attn.o_proj(out.reshape(2, t, -1))
  assert _rel(sparse[0], want) < 1e-5


# ----------------------------------------------------------------------------- caches


@pytest.fixture(scope="module")
def tiny_model():
  return models.MiniMaxM3(TINY, rngs=nnx.Rngs(0))


def test_incremental_decode_matches_full_forward(tiny_model):
  t = 96  # three times the dense span: selection active in the MSA layers
  tokens = _tokens(2, t, seed=1)
  full = tiny_model.forward(tokens)
  step = jax.jit(lambda m, tok, c: m(tok, c))
  cache = models.init_cache(TINY, 2, t)
  pieces = []
  for start, stop in [(0, 40), (40, 41), (41, 42), (42, 50), (50, 51), (51, 96)]:
    logits, cache = step(tiny_model, tokens[:, start:stop], cache)
    pieces.append(logits)
  inc = jnp.concatenate(pieces, axis=1)
  assert np.asarray(cache.lengths).tolist() == [t, t]
  assert _rel(inc, full) < 1e-5
  np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=2e-4)


def test_ragged_batch_matches_single_sequences(tiny_model):
  a, b = _tokens(1, 50, seed=2), _tokens(1, 37, seed=3)  # both past k*Bk = 32 tokens
  batch = jnp.zeros((2, 50), jnp.int32).at[0].set(a[0]).at[1, :37].set(b[0])
  run = nnx.jit(lambda m, t, c, n: m(t, c, n))
  forward = nnx.jit(lambda m, t: m.forward(t))
  cache = models.init_cache(TINY, 2, 64)
  logits, cache = run(tiny_model, batch, cache, jnp.array([50, 37]))
  assert np.asarray(cache.lengths).tolist() == [50, 37]
  np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(forward(tiny_model, a)[0]),
                             atol=2e-4)
  np.testing.assert_allclose(np.asarray(logits[1, :37]),
                             np.asarray(forward(tiny_model, b)[0]), atol=2e-4)
  nxt = jnp.array([[7], [9]])  # one decode step for both
  step, cache = run(tiny_model, nxt, cache, jnp.array([1, 1]))
  ref_a = forward(tiny_model, jnp.concatenate([a, nxt[:1]], 1))[0, -1]
  ref_b = forward(tiny_model, jnp.concatenate([b, nxt[1:]], 1))[0, -1]
  np.testing.assert_allclose(np.asarray(step[0, 0]), np.asarray(ref_a), atol=2e-4)
  np.testing.assert_allclose(np.asarray(step[1, 0]), np.asarray(ref_b), atol=2e-4)


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("axes", [{"data": 2, "tensor": 2, "expert": 2}, {"tensor": 4},
                                  {"expert": 4, "data": 2}, {"fsdp": 2, "tensor": 2}])
def test_sharded_forward_equals_unsharded(axes):
  model = models.MiniMaxM3(TINY, rngs=nnx.Rngs(0))
  tokens = _tokens(4, 48, seed=4)
  want = model.forward(tokens)
  mesh = sharding.make_mesh(axes)
  sharding.shard_model(model, mesh)
  moe = model.layers[1].block_sparse_moe
  if "expert" in axes:  # experts really are split across the expert axis
    assert moe.w1[...].sharding.spec[0] == "expert"
  if "tensor" in axes:
    assert model.layers[0].self_attn.q_proj.kernel[...].sharding.spec[1] == "tensor"
  with sharding.activation_sharding(mesh):
    got = nnx.jit(lambda m, t: m.forward(t))(model, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)


def test_sharded_decode_with_sharded_cache(tiny_model):
  tokens = _tokens(2, 60, seed=8)
  cache = models.init_cache(TINY, 2, 64)
  want, want_cache = tiny_model(tokens[:, :59], cache)
  want_step, _ = tiny_model(tokens[:, 59:], want_cache)
  model = models.MiniMaxM3(TINY, rngs=nnx.Rngs(0))  # same init as tiny_model
  mesh = sharding.make_mesh({"data": 2, "tensor": 2})
  sharding.shard_model(model, mesh)
  cache = jax.device_put(cache, sharding.cache_shardings(cache, mesh))
  assert cache.k[0].sharding.spec[2] == "tensor"
  step = nnx.jit(lambda m, t, c: m(t, c))
  with sharding.activation_sharding(mesh):
    got, cache = step(model, tokens[:, :59], cache)
    got_step, _ = step(model, tokens[:, 59:], cache)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)
  np.testing.assert_allclose(np.asarray(got_step), np.asarray(want_step), atol=2e-4)


def test_random_init_trains_and_index_branch_gets_no_lm_gradient():
  import optax
  model = models.MiniMaxM3(TINY, rngs=nnx.Rngs(1))
  tokens = _tokens(2, 48, seed=9)

  def loss_fn(m):
    logits = m.forward(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  grads = nnx.grad(loss_fn)(model)
  attn = grads.layers[1].self_attn
  assert float(jnp.abs(attn.index_q_proj.kernel[...]).max()) == 0.0  # stop-gradient input
  assert float(jnp.abs(attn.index_k_proj.kernel[...]).max()) == 0.0
  assert float(jnp.abs(attn.q_proj.kernel[...]).max()) > 0.0
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(m, opt):
    loss, g = nnx.value_and_grad(loss_fn)(m)
    opt.update(m, g)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(12)]
  assert np.isfinite(losses).all()
  assert losses[0] > np.log(TINY.vocab_size) - 1.0  # starts near uniform
  assert losses[-1] < 0.7 * losses[0]


def test_bfloat16_model_close_to_float32():
  f32 = models.MiniMaxM3(TINY, rngs=nnx.Rngs(2))
  bf16 = models.MiniMaxM3(TINY, rngs=nnx.Rngs(2), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  tokens = _tokens(1, 32, seed=10)  # within k*Bk: no block selection to flip on rounding
  a, b = np.asarray(f32.forward(tokens))[0], np.asarray(bf16.forward(tokens))[0]
  assert np.isfinite(b).all()
  # Per token ~1% off; a token whose top-k expert choice flips on rounding may be far off.
  per_token = np.linalg.norm(b - a, axis=-1) / np.linalg.norm(a, axis=-1)
  assert np.median(per_token) < 3e-2 and np.mean(per_token < 5e-2) >= 0.9
  assert bf16.layers[1].block_sparse_moe.gate[...].dtype == jnp.float32  # router stays fp32


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_kernels_plug_in_by_implementation(impl, tiny_model):
  """The same weights through the Pallas kernels (interpret mode) give the same logits."""
  model = models.MiniMaxM3(TINY, rngs=nnx.Rngs(0), implementation=impl, interpret=True)
  tokens = _tokens(1, 40, seed=11)
  np.testing.assert_allclose(np.asarray(model.forward(tokens)),
                             np.asarray(tiny_model.forward(tokens)), atol=2e-4)


def test_attention_kernels_run_per_device_on_a_mesh():
  """With the Pallas kernels on a data x tensor mesh, attention runs in a shard_map (each
  device its rows and KV groups, the kernels inside it): the unsharded logits; training's
  forward too, its indexer KL averaged over the devices, and the gradients."""
  model = models.MiniMaxM3(TINY, rngs=nnx.Rngs(0), implementation="pallas_gpu",
                           interpret=True)
  tokens = _tokens(2, 40, seed=4)
  want = model.forward(tokens)

  def loss(m, t):
    logits, aux = m.train_forward(t, attention="msa", indexer_loss="selected")
    return jnp.mean(logits ** 2) + jnp.sum(aux["kl"]), (logits, aux["kl"])

  grad = nnx.value_and_grad(loss, has_aux=True)
  (want_loss, (_, want_kl)), want_grads = grad(model, tokens)
  mesh = sharding.make_mesh({"data": 2, "tensor": 2})
  sharding.shard_model(model, mesh)
  with sharding.activation_sharding(mesh):
    jaxpr = str(jax.make_jaxpr(lambda t: model.forward(t))(tokens))
    got = nnx.jit(lambda m, t: m.forward(t))(model, tokens)
    (got_loss, (_, got_kl)), got_grads = nnx.jit(grad)(model, tokens)
  assert "pallas_call" in jaxpr[jaxpr.index("shard_map"):]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)
  np.testing.assert_allclose(np.asarray(got_kl), np.asarray(want_kl), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
  flat_want = dict(nnx.to_flat_state(want_grads))
  for path, g in nnx.to_flat_state(got_grads):
    np.testing.assert_allclose(np.asarray(g[...]), np.asarray(flat_want[path][...]),
                               atol=1e-4, rtol=1e-3, err_msg=str(path))
