"""Launch parameters of ``index_topk`` on GPUs (tuning sections "index" and "index_decode").

``msa_jax.tuning.config(section)`` returns one of these: the defaults below, replaced by the
card's tuned data (``msa_jax/tuning/data/<card>/``), a scoped ``tuning.override`` and the
arguments a caller passes, in that order.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
  """Where the top-k happens and how the kernels are launched.

  selection: "scores" (the Triton kernel writes block scores, XLA takes the top-k), "tile"
    (each key tile's top blocks come out of the kernel, then a merge), "fused" (a running
    top-k inside the kernel; prefill only) or "mosaic" (as "fused" on Hopper: ``gpu_mosaic``,
    wgmma + TMA; bf16/f16 only, other inputs take "fused" or "tile").
  block_rows, blocks_per_tile, num_warps, num_stages: the Triton kernels' tile (query rows x
    key blocks) and launch.
  mosaic_stages, mosaic_fp8_stages: the Mosaic kernel's key-block ring in bf16 / FP8 (FP8
    tiles are half the bytes, so a deeper ring fits).
  min_programs: decode only: blocks_per_tile is halved (down to 1) until the grid has this
    many programs, so a short cache still spreads over the GPU (compiled runs only); the
    Mosaic decode splits the keys over as many CTAs. 0: no minimum.
  """
  selection: str = "scores"
  block_rows: int = 64
  blocks_per_tile: int = 16
  num_warps: int = 4
  num_stages: int = 2
  mosaic_stages: int = 4
  mosaic_fp8_stages: int = 4
  min_programs: int = 0


# Decode (at most MAX_DECODE_QUERIES queries per sequence) has few rows, so the grid comes from
# the key tiles and the best tile differs from prefill's. One program per SM (132 on an
# H100/H200; ``heuristic`` reads the card's): spreading further splits long caches into more
# partial top-k lists than it gains.
DEFAULTS = {"index": Config(), "index_decode": Config(min_programs=132)}


def heuristic(section: str, device) -> Config:
  """The default for a card without tuned data: decode spreads over the card's SMs."""
  sms = getattr(device, "core_count", None)
  if section == "index_decode" and device.platform == "gpu" and sms:
    return dataclasses.replace(DEFAULTS[section], min_programs=int(sms))
  return DEFAULTS[section]
