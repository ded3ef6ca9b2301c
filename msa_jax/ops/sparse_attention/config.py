"""Launch parameters of ``sparse_attention`` on GPUs (tuning sections "sparse",
"sparse_mosaic", "decode" and "sparse_bwd").

``msa_jax.tuning.config(section)`` returns one of these: the defaults below, replaced by the
card's tuned data (``msa_jax/tuning/data/<card>/``), a scoped ``tuning.override`` and the
arguments a caller passes, in that order.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
  """The prefill path (``paths._gpu_kv_outer``) and the Triton KV-outer kernel.

  kernel: "triton" (``gpu_triton``) or "mosaic" (``gpu_mosaic``, Hopper TMA + wgmma; bf16/f16
    only, other inputs stay on Triton).
  tile_rows: query rows (positions x the group's heads) per tile; tiles_per_item: tiles that
    share one load of a block's K/V (the schedule's item size); items_per_program, num_warps,
    num_stages: the Triton kernel's launch.
  query_chunk: prefill query ranges longer than this run as pieces of this many queries
    (schedule -> kernel -> combine each; None: one piece).
  union_max: with kernel "mosaic", when the mean number of distinct blocks selected by the
    queries of an 8-query tile is at most this, run query-outer over those unions
    (``gpu_mosaic_union``) instead of KV-outer; 0: never. Set where the union kernel's time
    (linear in the mean union) meets KV-outer's.
  union_mix: decide per tile instead (tiles with at most union_max blocks take the union
    path, the others KV-outer, in one call; for selections that mix shared and scattered
    blocks).
  """
  kernel: str = "triton"
  tile_rows: int = 128
  tiles_per_item: int = 1
  items_per_program: int = 1
  num_warps: int = 4
  num_stages: int = 2
  query_chunk: int | None = None
  union_max: float = 0
  union_mix: bool = False


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """The Mosaic GPU KV-outer kernel (``gpu_mosaic``): tile_rows per compute warpgroup (a
  multiple of 64 rows), tiles_per_item = compute warpgroups (1 or 2), num_stages = q/O
  shared-memory slots (>= 2), num_ctas = persistent CTAs (None: one per SM), kv_stages = K/V
  slots (a ring of their own)."""
  tile_rows: int = 64
  tiles_per_item: int = 2
  num_stages: int = 2
  num_ctas: int | None = None
  kv_stages: int = 2


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """The split-K decode kernel (``gpu_triton_paged``)."""
  num_warps: int = 4
  num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
  """The Triton backward (``gpu_triton_bwd``): tile_rows = query rows (positions x heads) of
  a dK/dV tile; tiles_per_item = tiles one dK/dV program walks against its block (bounds
  per-program work on hot blocks; fewer means more programs and more float32 partials);
  num_warps/num_stages the dK/dV kernel's, dq_* the dQ kernel's, reduce_num_warps the
  partials' reduction. At M3 shapes on the H200 256 rows exceed shared memory."""
  tile_rows: int = 128
  tiles_per_item: int = 32
  num_warps: int = 8
  num_stages: int = 2
  dq_num_warps: int = 2
  dq_num_stages: int = 2
  reduce_num_warps: int = 4


DEFAULTS = {"sparse": Config(), "sparse_mosaic": MosaicConfig(), "decode": DecodeConfig(),
            "sparse_bwd": BackwardConfig()}

