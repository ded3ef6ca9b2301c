"""Parity with an independent implementation: Hugging Face transformers' ``minimax_m3_vl``.

A tiny random ``MiniMaxM3SparseForConditionalGeneration`` is built in transformers from a
config.json in the released nested shape (docs/minimax_m3.md §1.2), every weight re-drawn so
nothing sits at its trivial init (Gemma norm offsets, routing bias, SwiGLU clamps all matter),
and written with transformers' own ``save_pretrained``. transformers reverses its
``conversion_mapping.py`` renames on save, so the folder holds the released tensor names
(``language_model.model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight``,
``...self_attn.index_k_proj.weight``, ``language_model.lm_head.weight``, vision/projector
tensors at the top level; §2.1); the test asserts that, then puts the released nested
config.json back in place (transformers writes its flat §1.3 shape) and loads the folder
with ``models.checkpoint.load_hf``. In float32 it compares (a) full-prompt logits over a
prompt long enough that MSA selection is active in both sparse layers, and (b) greedy
tokens and per-step logits of transformers' ``generate`` against this project's cached
decode path, across a KV-block boundary.

transformers 5.24 agrees with docs/msa.md on every point checked here: per-group (per index
head) top-k, fp32 unscaled index scores, token-level causal mask before the block max-pool,
the query's own block forced (+inf), -1 padding. It reads the RoPE width from
``rope_parameters.partial_rotary_factor`` and ignores ``rotary_dim`` (the released config
has both, consistent), so the config here keeps them consistent too.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from models import cache as cache_lib  # noqa: E402
from models import checkpoint  # noqa: E402
from models import config as config_lib  # noqa: E402

BLOCK, TOPK = 16, 2  # selection is active past TOPK * BLOCK = 32 tokens
PROMPT_LEN = 76  # 5 KV blocks: 3 of the 5 visible blocks are dropped for the last queries
NEW_TOKENS = 8  # decode positions 76..83 cross into block 5
RTOL = 1e-4  # max |diff| <= RTOL * max |logit| (float32 on both sides)

# The released text_config shape (docs/minimax_m3.md §1.2), scaled down; layer 0 full attention
# + dense MLP, layers 1-2 MSA + MoE, as layers 0-2 / 3-59 in MiniMax-M3.
TEXT_CONFIG = {
    "architectures": ["MiniMaxM3SparseForCausalLM"],
    "num_hidden_layers": 3, "hidden_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "use_gemma_norm": True,
    "use_qk_norm": True, "qk_norm_type": "per_head", "attention_output_gate": False,
    "rope_theta": 10000.0, "rotary_dim": 8, "partial_rotary_factor": 0.5,
    "hidden_act": "swigluoai", "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
    "intermediate_size": 32, "dense_intermediate_size": 96, "shared_intermediate_size": 32,
    "num_local_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "scoring_func": "sigmoid", "use_routing_bias": True, "routed_scaling_factor": 2.0,
    "moe_layer_freq": [0, 1, 1], "tie_word_embeddings": False,
    "bos_token_id": None, "eos_token_id": None,
    "sparse_attention_config": {
        "use_sparse_attention": True, "sparse_attention_freq": [0, 1, 1],
        "sparse_disable_index_value": [0, 1, 1], "sparse_index_dim": 16,
        "sparse_num_index_heads": 2, "sparse_block_size": BLOCK, "sparse_topk_blocks": TOPK,
        "sparse_score_type": "max", "sparse_init_block": 0, "sparse_local_block": 1},
}
RELEASED_CONFIG = {
    "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
    "model_type": "minimax_m3_vl", "torch_dtype": "float32", "tie_word_embeddings": False,
    "projector_hidden_size": 64, "text_config": TEXT_CONFIG,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32,
                      "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "patch_size": 14, "image_size": 56},
}


def _randomize(model, seed=0):
  """Fresh random weights at O(1) activation scale; nothing left at its trivial init."""
  gen = torch.Generator().manual_seed(seed)
  randn = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float32)
  with torch.no_grad():
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if "e_score_correction_bias" in n)
    for name, t in sorted(tensors.items()):
      if "language_model" not in name and name != "lm_head.weight":
        continue  # vision tower / projector: unused by a text prompt
      if name.endswith("norm.weight"):
        value = 0.2 * randn(t.shape)  # Gemma offsets: the norm scales by 1 + w
      elif name.endswith("e_score_correction_bias"):
        value = 0.2 * randn(t.shape)  # large enough to change some expert choices
      elif name.endswith("embed_tokens.weight"):
        value = randn(t.shape)
      elif "gate_up_proj" in name:
        value = 3.0 * randn(t.shape) / t.shape[-1] ** 0.5  # reaches the +-7 SwiGLU clamps
      else:
        value = randn(t.shape) / t.shape[-1] ** 0.5
      t.copy_(value)


@pytest.fixture(scope="module")
def hf_and_folder(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.MiniMaxM3VLConfig(**json.loads(json.dumps(RELEASED_CONFIG)))
  text = config.text_config
  assert text.layer_types == ["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"]
  assert text.mlp_layer_types == ["dense", "sparse", "sparse"]
  assert (text.index_block_size, text.index_topk_blocks) == (BLOCK, TOPK)
  hf = transformers.MiniMaxM3SparseForConditionalGeneration(config).eval()
  _randomize(hf)
  folder = str(tmp_path_factory.mktemp("hf_m3"))
  hf.save_pretrained(folder, max_shard_size="200KB")  # sharded + index.json, as released
  flat_config = json.load(open(os.path.join(folder, "config.json")))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(RELEASED_CONFIG, f, indent=1)  # the released nested shape, as the real folder
  return hf, folder, flat_config


@pytest.fixture(scope="module")
def ours(hf_and_folder):
  _, folder, _ = hf_and_folder
  return checkpoint.load_hf(folder, dtype=jnp.float32, progress=False)


def _tensor_names(folder):
  from safetensors import safe_open
  names = set()
  for file in os.listdir(folder):
    if file.endswith(".safetensors"):
      with safe_open(os.path.join(folder, file), framework="numpy") as f:
        names.update(f.keys())
  return names


def _prompt(batch, length, seed):
  return np.random.default_rng(seed).integers(0, TEXT_CONFIG["vocab_size"], (batch, length))


@nnx.jit
def _forward(model, tokens):
  return model.forward(tokens)


def _max_rel(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_transformers_writes_the_released_layout(hf_and_folder):
  _, folder, flat_config = hf_and_folder
  names = _tensor_names(folder)
  index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
  assert set(index["weight_map"]) == names and len(set(index["weight_map"].values())) > 1
  for name in ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
               "language_model.model.norm.weight",
               "language_model.model.layers.0.mlp.gate_proj.weight",
               "language_model.model.layers.1.self_attn.index_q_proj.weight",
               "language_model.model.layers.1.self_attn.index_k_proj.weight",
               "language_model.model.layers.2.self_attn.index_k_norm.weight",
               "language_model.model.layers.1.block_sparse_moe.gate.weight",
               "language_model.model.layers.1.block_sparse_moe.e_score_correction_bias",
               "language_model.model.layers.2.block_sparse_moe.experts.3.w1.weight",
               "language_model.model.layers.2.block_sparse_moe.experts.3.w3.weight",
               "language_model.model.layers.2.block_sparse_moe.experts.3.w2.weight",
               "language_model.model.layers.1.block_sparse_moe.shared_experts.up_proj.weight",
               "patch_merge_mlp.linear_1.weight"):
    assert name in names, name
  assert not any(".indexer." in n or "gate_up_proj" in n or n.startswith("model.")
                 for n in names)
  assert not any("index_q_proj" in n for n in names if ".layers.0." in n)
  # Both config shapes, transformers' flat one and the released nested one, read the same.
  assert config_lib.from_hf_config(flat_config) == config_lib.from_hf_config(RELEASED_CONFIG)


def test_logits_match_with_msa_selection_active(hf_and_folder, ours):
  hf, folder, _ = hf_and_folder
  tokens = _prompt(2, PROMPT_LEN, seed=1)
  selections, gate_up = [], []
  layers = hf.model.language_model.layers
  hooks = [layer.self_attn.indexer.register_forward_hook(
      lambda mod, args, out: selections.append(out.numpy()))
           for layer in layers if layer.self_attn.indexer is not None]
  hooks += [mod.register_forward_hook(lambda mod, args, out: gate_up.append(out.chunk(2, -1)))
            for name, mod in layers.named_modules()
            if name.endswith("gate_up_proj") and isinstance(mod, torch.nn.Linear)]
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(tokens)).logits.numpy()
  for h in hooks:
    h.remove()
  # Selection is really active: both sparse layers, [B, G, T, k], per-group choices that differ.
  assert len(selections) == 2
  late = slice(TOPK * BLOCK, None)
  for sel in selections:
    assert sel.shape == (2, 2, PROMPT_LEN, TOPK) and np.all(sel[:, :, late] >= 0)
    assert np.any(sel[:, 0, late] != sel[:, 1, late])  # groups choose differently somewhere

  # The SwiGLU-OAI clamps (gate <= 7, |up| <= 7) are reached in the dense MLP / shared experts.
  limit = TEXT_CONFIG["swiglu_limit"]
  assert any(bool((g > limit).any()) and bool((u.abs() > limit).any()) for g, u in gate_up)

  got = np.asarray(_forward(ours, jnp.asarray(tokens)))
  assert got.shape == want.shape
  err = _max_rel(got, want)
  assert err <= RTOL, f"max |logit diff| / max |logit| = {err:.2e}"

  # The comparison is sensitive to selection: dense attention (top-k covering every block)
  # on the same weights misses transformers' logits by far more than the tolerance.
  dense_cfg = json.loads(json.dumps(RELEASED_CONFIG))
  dense_cfg["text_config"]["sparse_attention_config"]["sparse_topk_blocks"] = 64
  dense_dir = os.path.join(os.path.dirname(folder), "dense_view")
  os.makedirs(dense_dir, exist_ok=True)
  for file in os.listdir(folder):
    if file.endswith(".safetensors") or file.endswith(".index.json"):
      target = os.path.join(dense_dir, file)
      if not os.path.exists(target):
        os.symlink(os.path.join(folder, file), target)
  with open(os.path.join(dense_dir, "config.json"), "w") as f:
    json.dump(dense_cfg, f)
  dense = checkpoint.load_hf(dense_dir, dtype=jnp.float32, progress=False)
  dense_logits = np.asarray(_forward(dense, jnp.asarray(tokens)))
  np.testing.assert_allclose(dense_logits[:, :TOPK * BLOCK], want[:, :TOPK * BLOCK],
                             atol=RTOL * np.abs(want).max())  # identical before selection
  assert _max_rel(dense_logits, want) > 100 * RTOL


def test_greedy_generation_matches(hf_and_folder, ours):
  hf, _, _ = hf_and_folder
  tokens = _prompt(2, PROMPT_LEN, seed=2)
  with torch.no_grad():
    out = hf.generate(input_ids=torch.from_numpy(tokens),
                      attention_mask=torch.ones_like(torch.from_numpy(tokens)),
                      max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                      pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
                      output_logits=True)
  want_tokens = out.sequences[:, PROMPT_LEN:].numpy()
  want_logits = np.stack([x.numpy() for x in out.logits], axis=1)  # [B, NEW, V]
  assert want_tokens.shape == (2, NEW_TOKENS)

  @nnx.jit
  def step(model, tok, cache):
    logits, cache = model(tok, cache)
    return logits[:, -1], cache

  cache = cache_lib.init_cache(ours.config, 2, PROMPT_LEN + NEW_TOKENS, jnp.float32)
  logits, cache = step(ours, jnp.asarray(tokens), cache)  # prefill
  got_tokens, got_logits = [], []
  for i in range(NEW_TOKENS):
    got_logits.append(np.asarray(logits))
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    got_tokens.append(np.asarray(nxt))
    if i + 1 < NEW_TOKENS:
      logits, cache = step(ours, nxt[:, None], cache)
  got_tokens, got_logits = np.stack(got_tokens, 1), np.stack(got_logits, 1)
  np.testing.assert_array_equal(got_tokens, want_tokens)
  err = _max_rel(got_logits, want_logits)
  assert err <= RTOL, f"max |logit diff| / max |logit| = {err:.2e}"
