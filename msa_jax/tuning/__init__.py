"""Per-card launch parameters of the GPU kernels: tuning as data.

``DEFAULTS`` below, per kernel section; ``data/<card>/<section>.json`` holds the values that
``scripts/benchmark.py --tune`` (``msa_jax.tuning.autotune``) chose on a card, ``<card>`` being
the device kind in lower case with ``_`` for anything else (``NVIDIA H200`` ->
``nvidia_h200``). Unknown cards (and CPU interpret runs) get the defaults. ``override``
changes them for the kernels traced inside a block (sweeps, tests).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re

import jax


DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

DEFAULTS = {
    # selection: where the top-k happens (index_topk.py): "scores" (XLA over the block-score
    # matrix), "tile" (per key tile in the kernel, then XLA over the candidates), "fused"
    # (a running top-k in the kernel; prefill only) or "mosaic" (as "fused", on Hopper:
    # index_topk_mgpu.py, wgmma + TMA; bf16/f16 only, other inputs take "fused"). The other
    # keys are the Triton kernels'; mosaic_stages / mosaic_fp8_stages are the Mosaic kernel's
    # key-block ring in bf16 / FP8 (FP8 tiles are half the bytes, so a deeper ring fits and
    # pays; measurements in benchmarks/NOTES.md).
    "index": {"block_rows": 64, "blocks_per_tile": 16, "num_warps": 4, "num_stages": 2,
              "selection": "scores", "mosaic_stages": 4, "mosaic_fp8_stages": 4},
    # The same kernels for decode (at most checks.MAX_DECODE_QUERIES queries per sequence):
    # few rows, so
    # the grid comes from the key tiles and the best tile differs from prefill's.
    # min_programs: blocks_per_tile is halved (down to 1) until the grid has this many
    # programs, so a short cache still spreads over the GPU (compiled runs only). One per SM
    # of an H100/H200: spreading further splits long caches into more partial top-k lists
    # than it gains (benchmarks/probes/index_decode_spread.py).
    "index_decode": {"block_rows": 64, "blocks_per_tile": 16, "num_warps": 4, "num_stages": 2,
                     "selection": "scores", "min_programs": 132},
    # tile_rows: query rows (positions x the group's heads) per tile; tiles_per_item: tiles
    # that share one load of a block's K/V (the schedule's item size).
    # kernel: "triton" (sparse_attention.py) or "mosaic" (sparse_attention_mgpu.py, Hopper
    # TMA + wgmma; bf16/f16 only, other inputs stay on Triton). The other keys are Triton's.
    # query_chunk: prefill query ranges longer than this run as pieces of this many queries
    # (schedule -> kernel -> combine each; None: one piece).
    # union_max (with kernel "mosaic"): when the mean number of distinct blocks selected by
    # the queries of an 8-query tile is at most this, the call runs query-outer over those
    # unions (sparse_attention_union_mgpu.py) instead of KV-outer; 0: never. Set where the
    # union kernel's time (linear in the mean union) meets KV-outer's (benchmarks/NOTES.md).
    # union_mix: decide per tile instead (tiles with at most union_max blocks take the union
    # path, the others KV-outer, in one call; for selections that mix shared and scattered
    # blocks). On the H200 it matches the per-call choice on uniform selections and beats it
    # where the two kinds of tile alternate.
    "sparse": {"tile_rows": 128, "tiles_per_item": 1, "items_per_program": 1, "num_warps": 4,
               "num_stages": 2, "kernel": "triton", "query_chunk": None, "union_max": 0,
               "union_mix": False},
    # The Mosaic GPU kernel: tile_rows per compute warpgroup (a multiple of 64 rows),
    # tiles_per_item = compute warpgroups (1 or 2), num_stages = shared-memory slots (>= 2),
    # num_ctas = persistent CTAs (None: one per SM), kv_stages = K/V slots (a ring of their
    # own).
    "sparse_mosaic": {"tile_rows": 64, "tiles_per_item": 2, "num_stages": 2, "num_ctas": None,
                      "kv_stages": 2},
    "decode": {"num_warps": 4, "num_stages": 2},
    # Backward (sparse_attention_bwd.py): tile_rows = query rows (positions x heads) of a
    # dK/dV tile; tiles_per_item = tiles one dK/dV program walks against its block (bounds
    # per-program work on hot blocks; fewer means more programs and more float32 partials).
    # H200, M3 shapes: 128 rows x 32 tiles, 8 warps (256 rows exceed shared memory).
    "sparse_bwd": {"tile_rows": 128, "tiles_per_item": 32, "num_warps": 8, "num_stages": 2,
                   "dq_num_warps": 2, "dq_num_stages": 2, "reduce_num_warps": 4},
}


def card_dir(kind: str) -> str:
  """The data folder's name for a device kind: ``NVIDIA H200`` -> ``nvidia_h200``."""
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


@functools.lru_cache(maxsize=None)
def _card_table(kind: str) -> dict:
  """{section: parameters} stored for this device kind (empty if none)."""
  folder = os.path.join(DATA_DIR, card_dir(kind))
  if not os.path.isdir(folder):
    return {}
  table = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".json"):
      with open(os.path.join(folder, name)) as f:
        table[name[:-len(".json")]] = json.load(f)["config"]
  return table


def save(kind: str, sections: dict, data_dir: str = DATA_DIR, **meta) -> list[str]:
  """Write ``{section: parameters}`` as this card's data (one file per section, replacing
  those sections only; ``meta``, such as the shapes tuned at, is stored beside them).
  Returns the paths written."""
  folder = os.path.join(data_dir, card_dir(kind))
  os.makedirs(folder, exist_ok=True)
  paths = []
  for section, params in sections.items():
    if section not in DEFAULTS:
      raise ValueError(f"unknown tuning section {section!r}; known: {sorted(DEFAULTS)}")
    path = os.path.join(folder, f"{section}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:  # then renamed: a crash leaves the old file whole
      json.dump({"device_kind": kind, "config": params, **meta}, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
    paths.append(path)
  if data_dir == DATA_DIR:
    _card_table.cache_clear()
  return paths


def device_kind() -> str:
  device = jax.devices()[0]
  return device.device_kind if device.platform == "gpu" else device.platform


_scoped: dict[str, dict] = {}


@contextlib.contextmanager
def override(kernel: str, /, **params):  # positional: "kernel" is also a key of "sparse"
  """Within the block, kernels traced use ``params`` for ``kernel`` (tuning sweeps, tests).

  The parameters are read at trace time and are not part of jit's cache key: trace a fresh
  function inside the block (``jax.jit(lambda *a: f(*a))``), since ``jax.jit(f)`` of a function
  traced before reuses that trace, whatever the override."""
  previous = _scoped.get(kernel)
  _scoped[kernel] = dict(previous or {}, **params)
  try:
    yield
  finally:
    if previous is None:
      _scoped.pop(kernel)
    else:
      _scoped[kernel] = previous


def config(kernel: str, /, **explicit) -> dict:
  """Launch parameters of ``kernel``: defaults < this card's table < ``override`` < explicit."""
  params = dict(DEFAULTS[kernel])
  params.update(_card_table(device_kind()).get(kernel, {}))
  params.update(_scoped.get(kernel, {}))
  params.update({k: v for k, v in explicit.items() if v is not None})
  return params
