"""Flax NNX models of the MiniMax-M3 family, built on msa_jax (docs/minimax_m3.md)."""

from models.cache import Cache, init_cache
from models.config import ModelConfig, from_hf_config, preset
from models.transformer import MiniMaxM3

__all__ = ["Cache", "MiniMaxM3", "ModelConfig", "from_hf_config", "init_cache", "preset"]
