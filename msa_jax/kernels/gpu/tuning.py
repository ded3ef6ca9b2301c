"""Per-card launch parameters of the GPU kernels.

Defaults below; ``tuned_configs.json`` beside this file holds the values chosen by
``scripts/benchmark.py --tune`` for each card (keyed by ``device_kind``), so tuning is data,
not code. Unknown cards (and CPU interpret runs) get the defaults.
"""

from __future__ import annotations

import functools
import json
import os

import jax

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_configs.json")

DEFAULTS = {
    "index": {"block_rows": 64, "blocks_per_tile": 16, "num_warps": 4, "num_stages": 2},
    "sparse": {"items_per_program": 1, "num_warps": 4, "num_stages": 2},
    "decode": {"num_warps": 4, "num_stages": 2},
}


@functools.lru_cache(maxsize=None)
def _table() -> dict:
  try:
    with open(TABLE_PATH) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}


def device_kind() -> str:
  device = jax.devices()[0]
  return device.device_kind if device.platform == "gpu" else device.platform


def config(kernel: str, **overrides) -> dict:
  """Launch parameters of ``kernel`` for the current card; explicit ``overrides`` win."""
  params = dict(DEFAULTS[kernel])
  params.update(_table().get(device_kind(), {}).get(kernel, {}))
  params.update({k: v for k, v in overrides.items() if v is not None})
  return params
