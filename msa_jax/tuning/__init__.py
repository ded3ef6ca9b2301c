"""Per-card launch parameters of the GPU kernels: tuning as data, keyed by shape.

Each section's parameters are a frozen dataclass defined beside the op
(``msa_jax/ops/<op>/config.py``; ``DEFAULTS`` below maps section -> default instance).
``data/<card>/<section>.json`` holds what ``scripts/benchmark.py --tune``
(``msa_jax.tuning.autotune``) chose on a card, one entry per shape tuned at::

    {"device_kind": "NVIDIA H200",
     "configs": [{"shape": {"context": 131072, "queries": 16384}, "config": {...}}, ...]}

``<card>`` is the device kind in lower case with ``_`` for anything else (``NVIDIA H200`` ->
``nvidia_h200``). A call that names its shape (``config(section, shape={"context": S,
"queries": T})``) gets the entry tuned at the nearest shape (log scale); unknown cards (and
CPU interpret runs) get the defaults. ``override`` changes them for the kernels traced
inside a block (sweeps, tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re

import jax

from msa_jax.ops.index_topk import config as index_config
from msa_jax.ops.sparse_attention import config as sparse_config

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

DEFAULTS = {**index_config.DEFAULTS, **sparse_config.DEFAULTS}


def shape(context: int, queries: int) -> dict:
  """The shape a config is tuned at and looked up by: keys per sequence, queries per call."""
  return {"context": int(context), "queries": int(queries)}


def fields(section: str) -> dict:
  """The default parameters of ``section`` as a dict."""
  return dataclasses.asdict(DEFAULTS[section])


def card_dir(kind: str) -> str:
  """The data folder's name for a device kind: ``NVIDIA H200`` -> ``nvidia_h200``."""
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


@functools.lru_cache(maxsize=None)
def _card_table(kind: str) -> dict:
  """{section: [(shape or None, parameters), ...]} stored for this device kind."""
  folder = os.path.join(DATA_DIR, card_dir(kind))
  if not os.path.isdir(folder):
    return {}
  table = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".json"):
      with open(os.path.join(folder, name)) as f:
        data = json.load(f)
      table[name[:-len(".json")]] = [(e.get("shape"), e["config"]) for e in data["configs"]]
  return table


def _distance(tuned_at: dict | None, shape: dict | None) -> float:
  """How far two shapes are apart: the sum of |log2| ratios over the sizes both name. An
  entry without a shape is the fallback (infinitely far); a call without one takes the
  first entry."""
  if not shape:
    return 0.0
  if not tuned_at:
    return math.inf
  a, b = tuned_at, shape
  common = [k for k in a if k in b and a[k] and b[k]]
  return sum(abs(math.log2(a[k] / b[k])) for k in common)


def _tuned(section: str, shape: dict | None) -> dict:
  """The card's parameters for ``section`` tuned at the shape nearest ``shape`` ({} if none)."""
  entries = _card_table(device_kind()).get(section, [])
  if not entries:
    return {}
  return min(entries, key=lambda entry: _distance(entry[0], shape))[1]


def save(kind: str, sections: dict, data_dir: str = DATA_DIR, shapes: dict | None = None,
         **meta) -> list[str]:
  """Store ``{section: parameters}`` as this card's data, each tuned at ``shapes[section]``
  (``{"context": S, "queries": T}``; None: any shape). An entry of the same shape is
  replaced, others are kept; ``meta`` is stored beside the entries. One file per section,
  written whole or not at all. Returns the paths written."""
  folder = os.path.join(data_dir, card_dir(kind))
  os.makedirs(folder, exist_ok=True)
  paths = []
  for section, params in sections.items():
    if section not in DEFAULTS:
      raise ValueError(f"unknown tuning section {section!r}; known: {sorted(DEFAULTS)}")
    dataclasses.replace(DEFAULTS[section], **params)  # unknown keys raise here, not on use
    shape = (shapes or {}).get(section)
    path = os.path.join(folder, f"{section}.json")
    entries = []
    if os.path.exists(path):
      with open(path) as f:
        entries = [e for e in json.load(f)["configs"] if e.get("shape") != shape]
    entries.append({"shape": shape, "config": params})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:  # then renamed: a crash leaves the old file whole
      json.dump({"device_kind": kind, "configs": entries, **meta}, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
    paths.append(path)
  if data_dir == DATA_DIR:
    _card_table.cache_clear()
  return paths


def _heuristic(section: str):
  """The section's default on this device: the index decode spreads over the card's SMs;
  the other defaults hold for any card (the Mosaic GPU kernels are chosen only by a card's
  data, after they were timed there)."""
  if section in index_config.DEFAULTS:
    return index_config.heuristic(section, jax.devices()[0])
  return DEFAULTS[section]


def device_kind() -> str:
  device = jax.devices()[0]
  return device.device_kind if device.platform == "gpu" else device.platform


_scoped: dict[str, dict] = {}


@contextlib.contextmanager
def override(section: str, /, **params):  # positional: "kernel" is a key of "sparse"
  """Within the block, kernels traced use ``params`` for ``section`` (tuning sweeps, tests).

  The parameters are read at trace time and are not part of jit's cache key: trace a fresh
  function inside the block (``jax.jit(lambda *a: f(*a))``), since ``jax.jit(f)`` of a function
  traced before reuses that trace, whatever the override."""
  previous = _scoped.get(section)
  _scoped[section] = dict(previous or {}, **params)
  try:
    yield
  finally:
    if previous is None:
      _scoped.pop(section)
    else:
      _scoped[section] = previous


def config(section: str, /, shape: dict | None = None, **explicit):
  """Launch parameters of ``section`` (a frozen dataclass): defaults < this card's data tuned
  at the shape nearest ``shape`` < ``override`` < explicit (None values ignored)."""
  params = dict(_tuned(section, shape))
  params.update(_scoped.get(section, {}))
  params.update({k: v for k, v in explicit.items() if v is not None})
  try:
    return dataclasses.replace(_heuristic(section), **params)
  except TypeError:
    unknown = sorted(set(params) - set(fields(section)))
    raise ValueError(f"unknown parameters {unknown} for tuning section {section!r}; known: "
                     f"{sorted(fields(section))}") from None
