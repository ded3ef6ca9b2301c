"""MiniMax-M3 family configuration (docs/minimax_m3.md §1).

``ModelConfig`` holds every field the architecture needs, validated on construction.
``from_hf_config`` reads a released ``config.json`` in either shape (§1.2 nested
``sparse_attention_config`` / ``moe_layer_freq``, or §1.3 flat ``index_*`` / ``layer_types`` /
``mlp_layer_types``); a ``hidden_act`` of "silu" still means SwiGLU-OAI (§1.3).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  # Per layer: True = MSA (sparse) attention, False = full causal attention.
  sparse_layers: tuple[bool, ...]
  # Per layer: True = MoE feed-forward, False = dense MLP.
  moe_layers: tuple[bool, ...]
  dense_intermediate_size: int
  intermediate_size: int = 0  # per routed expert
  shared_intermediate_size: int = 0
  num_experts: int = 0
  num_experts_per_tok: int = 0
  n_shared_experts: int = 0
  routed_scaling_factor: float = 1.0
  use_routing_bias: bool = True
  rms_norm_eps: float = 1e-6
  rope_theta: float = 5_000_000.0
  rotary_dim: int = 64
  swiglu_alpha: float = 1.702
  swiglu_limit: float = 7.0
  index_num_heads: int = 0
  index_head_dim: int = 0
  index_block_size: int = 128
  index_topk_blocks: int = 16
  # Precision of the index scores (inference knob, not in checkpoints): None (the index
  # projections' dtype) or "float8_e4m3fn" (msa_jax.index_topk's score_dtype).
  index_score_dtype: str | None = None
  # The routed experts' weights on the device (inference knob, not in checkpoints): "dense"
  # (param_dtype) or "mxfp8" (8-bit values and E8M0 scales, models.mxfp8).
  expert_weights: str = "dense"
  tie_word_embeddings: bool = False
  # The longest sequence (prompt + generated) the checkpoint was made for; None: unknown.
  max_position_embeddings: int | None = None

  def __post_init__(self):
    if self.max_position_embeddings is not None and int(self.max_position_embeddings) < 1:
      raise ValueError(f"max_position_embeddings must be >= 1; got "
                       f"{self.max_position_embeddings}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                       f"num_key_value_heads ({self.num_kv_heads})")
    for name in ("sparse_layers", "moe_layers"):
      value = getattr(self, name)
      if len(value) != self.num_layers:
        raise ValueError(f"{name} must list one entry per layer: expected {self.num_layers}, "
                         f"got {len(value)}")
    if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
      raise ValueError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}]; "
                       f"got {self.rotary_dim}")
    if any(self.sparse_layers):
      if self.index_num_heads != self.num_kv_heads:
        raise ValueError(f"sparse_num_index_heads ({self.index_num_heads}) must equal "
                         f"num_key_value_heads ({self.num_kv_heads}): one index head per "
                         "GQA group")
      if self.index_head_dim < 1 or self.index_head_dim % 2 or \
          self.index_head_dim < self.rotary_dim:
        raise ValueError(f"index head dim ({self.index_head_dim}) must be even and >= "
                         f"rotary_dim ({self.rotary_dim})")
      if self.index_block_size < 1 or self.index_topk_blocks < 1:
        raise ValueError(f"index block size and top-k must be >= 1; got "
                         f"{self.index_block_size}, {self.index_topk_blocks}")
    if self.index_score_dtype not in (None, "float8_e4m3fn"):
      raise ValueError(f"index_score_dtype must be None or 'float8_e4m3fn'; got "
                       f"{self.index_score_dtype!r}")
    if self.expert_weights not in ("dense", "mxfp8"):
      raise ValueError(f"expert_weights must be 'dense' or 'mxfp8'; got {self.expert_weights!r}")
    if any(self.moe_layers):
      if self.num_experts < 1 or not 1 <= self.num_experts_per_tok <= self.num_experts:
        raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                         f"[1, num_local_experts={self.num_experts}]")
      if self.intermediate_size < 1:
        raise ValueError("intermediate_size (per expert) must be >= 1")
      if self.n_shared_experts and self.shared_intermediate_size < 1:
        raise ValueError("shared_intermediate_size must be >= 1 with shared experts")
    if not all(self.moe_layers) and self.dense_intermediate_size < 1:
      raise ValueError("dense_intermediate_size must be >= 1 when a layer has a dense MLP")

  @property
  def heads_per_group(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


def _per_layer(value, n: int, name: str) -> tuple[bool, ...]:
  if isinstance(value, (int, bool)):
    return (bool(value),) * n
  if not isinstance(value, Sequence) or len(value) != n:
    got = len(value) if isinstance(value, Sequence) else type(value).__name__
    raise ValueError(f"{name} must have one entry per layer ({n}); got {got}")
  return tuple(bool(v) for v in value)


def _layer_types(value, n: int, name: str, true_names: set, false_names: set):
  if not isinstance(value, Sequence) or len(value) != n:
    got = len(value) if isinstance(value, Sequence) else type(value).__name__
    raise ValueError(f"{name} must have one entry per layer ({n}); got {got}")
  out = []
  for v in value:
    if v in true_names:
      out.append(True)
    elif v in false_names:
      out.append(False)
    else:
      raise ValueError(f"{name} entry {v!r} is not one of {sorted(true_names | false_names)}")
  return tuple(out)


def from_hf_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> ModelConfig:
  """Build a ``ModelConfig`` from a Hugging Face ``config.json`` (path, folder or dict)."""
  if isinstance(path_or_dict, Mapping):
    raw = dict(path_or_dict)
  else:
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    with open(path) as f:
      raw = json.load(f)
  d = dict(raw.get("text_config", raw))
  try:
    n = int(d["num_hidden_layers"])
    heads, kv_heads = int(d["num_attention_heads"]), int(d["num_key_value_heads"])
    hidden = int(d["hidden_size"])
    vocab = int(d["vocab_size"])
  except KeyError as e:
    raise ValueError(f"config is missing the required field {e.args[0]!r}") from None
  head_dim = int(d.get("head_dim") or hidden // heads)

  act = d.get("hidden_act", "swigluoai")
  if act not in ("swigluoai", "silu"):
    raise ValueError(f"hidden_act {act!r} is not supported: MiniMax-M3 uses SwiGLU-OAI "
                     "('swigluoai', or 'silu' in the flat config shape)")
  if not d.get("use_gemma_norm", True):
    raise ValueError("use_gemma_norm=false is not supported (MiniMax-M3 uses Gemma RMSNorm)")

  rope = d.get("rope_parameters") or {}
  theta = float(d.get("rope_theta", rope.get("rope_theta", 5_000_000.0)))
  if "rotary_dim" in d:
    rotary_dim = int(d["rotary_dim"])
  else:
    factor = d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
    rotary_dim = int(head_dim * float(factor))

  index = {}
  if "sparse_attention_config" in d:
    sac = d["sparse_attention_config"]
    use = sac.get("use_sparse_attention", True)
    sparse = (_per_layer(sac.get("sparse_attention_freq", 1), n, "sparse_attention_freq")
              if use else (False,) * n)
    if sac.get("sparse_score_type", "max") != "max":
      raise ValueError(f"sparse_score_type {sac['sparse_score_type']!r} is not supported "
                       "(only 'max')")
    if int(sac.get("sparse_init_block", 0)) != 0 or int(sac.get("sparse_local_block", 1)) != 1:
      raise ValueError("only sparse_init_block=0 and sparse_local_block=1 are supported")
    index = dict(index_num_heads=int(sac.get("sparse_num_index_heads", kv_heads)),
                 index_head_dim=int(sac.get("sparse_index_dim", head_dim)),
                 index_block_size=int(sac.get("sparse_block_size", 128)),
                 index_topk_blocks=int(sac.get("sparse_topk_blocks", 16)))
  elif "layer_types" in d:
    sparse = _layer_types(d["layer_types"], n, "layer_types", {"minimax_m3_sparse"},
                          {"full_attention"})
    if int(d.get("index_local_blocks", 1)) != 1:
      raise ValueError("only index_local_blocks=1 is supported")
    index = dict(index_num_heads=int(d.get("index_n_heads", kv_heads)),
                 index_head_dim=int(d.get("index_head_dim", head_dim)),
                 index_block_size=int(d.get("index_block_size", 128)),
                 index_topk_blocks=int(d.get("index_topk_blocks", 16)))
  else:
    sparse = (False,) * n

  if "moe_layer_freq" in d:
    moe = _per_layer(d["moe_layer_freq"], n, "moe_layer_freq")
  elif "mlp_layer_types" in d:
    moe = _layer_types(d["mlp_layer_types"], n, "mlp_layer_types", {"sparse"}, {"dense"})
  else:
    moe = (bool(d.get("num_local_experts", 0)),) * n

  return ModelConfig(
      vocab_size=vocab, hidden_size=hidden, num_layers=n, num_heads=heads,
      num_kv_heads=kv_heads, head_dim=head_dim, sparse_layers=sparse, moe_layers=moe,
      dense_intermediate_size=int(d.get("dense_intermediate_size",
                                        d.get("intermediate_size", 0))),
      intermediate_size=int(d.get("intermediate_size", 0)),
      shared_intermediate_size=int(d.get("shared_intermediate_size",
                                         d.get("intermediate_size", 0))),
      num_experts=int(d.get("num_local_experts", 0)),
      num_experts_per_tok=int(d.get("num_experts_per_tok", 0)),
      n_shared_experts=int(d.get("n_shared_experts", 0)),
      routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
      use_routing_bias=bool(d.get("use_routing_bias", True)),
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      rope_theta=theta, rotary_dim=rotary_dim,
      swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
      swiglu_limit=float(d.get("swiglu_limit", 7.0)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      max_position_embeddings=(int(d["max_position_embeddings"])
                               if d.get("max_position_embeddings") is not None else None),
      **index)


def to_hf_config(config: ModelConfig) -> dict:
  """The released (nested ``text_config``) config.json for ``config``; inverse of
  ``from_hf_config``."""
  c = config
  flags = lambda xs: [int(x) for x in xs]
  text = {
      "architectures": ["MiniMaxM3SparseForCausalLM"],
      "num_hidden_layers": c.num_layers, "hidden_size": c.hidden_size,
      "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim, "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps,
      "use_gemma_norm": True, "use_qk_norm": True, "qk_norm_type": "per_head",
      "attention_output_gate": False, "rope_theta": c.rope_theta, "rotary_dim": c.rotary_dim,
      "hidden_act": "swigluoai", "swiglu_alpha": c.swiglu_alpha, "swiglu_limit": c.swiglu_limit,
      "intermediate_size": c.intermediate_size,
      "dense_intermediate_size": c.dense_intermediate_size,
      "shared_intermediate_size": c.shared_intermediate_size,
      "num_local_experts": c.num_experts, "num_experts_per_tok": c.num_experts_per_tok,
      "n_shared_experts": c.n_shared_experts, "scoring_func": "sigmoid",
      "use_routing_bias": c.use_routing_bias, "routed_scaling_factor": c.routed_scaling_factor,
      "moe_layer_freq": flags(c.moe_layers), "tie_word_embeddings": c.tie_word_embeddings,
      "sparse_attention_config": {
          "use_sparse_attention": any(c.sparse_layers),
          "sparse_attention_freq": flags(c.sparse_layers),
          "sparse_disable_index_value": flags(c.sparse_layers),
          "sparse_index_dim": c.index_head_dim, "sparse_num_index_heads": c.index_num_heads,
          "sparse_block_size": c.index_block_size, "sparse_topk_blocks": c.index_topk_blocks,
          "sparse_score_type": "max", "sparse_init_block": 0, "sparse_local_block": 1},
  }
  if c.max_position_embeddings is not None:
    text["max_position_embeddings"] = c.max_position_embeddings
  return {"architectures": ["MiniMaxM3SparseForConditionalGeneration"],
          "model_type": "minimax_m3_vl", "torch_dtype": "bfloat16", "text_config": text}


def preset(name: str) -> ModelConfig:
  """A config shipped in ``models/configs/`` (package data): "tiny", "msa_109b" or "minimax_m3"."""
  path = os.path.join(CONFIG_DIR, f"{name}.json")
  if not os.path.exists(path):
    names = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
    raise ValueError(f"unknown preset {name!r}; available: {names}")
  return from_hf_config(path)
