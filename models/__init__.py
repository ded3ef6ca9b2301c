"""Flax NNX models of the MiniMax-M3 family, built on msa_jax (docs/minimax_m3.md).

The names below load on first use, so importing a light submodule (``models.cli``) does not
import JAX: a script's ``--help`` answers at once.
"""

import importlib

_EXPORTS = {"Cache": "models.cache", "init_cache": "models.cache",
            "ModelConfig": "models.config", "from_hf_config": "models.config",
            "preset": "models.config", "MiniMaxM3": "models.transformer",
            "create_model": "models.transformer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'models' has no attribute {name!r}")
