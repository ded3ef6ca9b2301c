"""Shared memory of the Triton kernels: what the card offers, what a launch asks for.

A Triton kernel whose tiles need more shared memory than the card has fails only when XLA
loads it (``RESOURCE_EXHAUSTED: Shared memory size limit exceeded``), so launch parameters
are checked against ``limit()`` ahead of time.
"""

from __future__ import annotations

import jax

# Opt-in shared memory per block by compute capability (CUDA programming guide, table of
# technical specifications): Hopper 227 KiB, A100 163 KiB, Ada/Ampere consumer 99 KiB.
LIMITS = {"9.0": 232448, "8.0": 166912, "8.6": 101376, "8.7": 166912, "8.9": 101376,
          "10.0": 232448, "12.0": 101376}
HOPPER = LIMITS["9.0"]


def limit(device=None) -> int:
  """Bytes of shared memory one block may use on ``device`` (default: the first GPU)."""
  device = device or jax.devices("gpu")[0]
  return LIMITS.get(str(device.compute_capability), min(LIMITS.values()))


def dkv_bytes(rows: int, d: int, dv: int, block_size: int, itemsize: int) -> int:
  """Shared memory of the backward's dK/dV kernel (``ops/sparse_attention/gpu_triton_bwd._dkv_kernel``) for
  a tile of ``rows`` query rows against a ``block_size``-key block.

  Triton stages the operands of its four dots: q and dO twice (``rows x (D + Dv)`` each way),
  K and V once, one ``rows x Bk`` probability tile, plus a few float32 values per row. Fitted
  to the requests XLA reported on an H200 (``benchmarks/results/nvidia_h200/smem.jsonl``; exact to within a
  few bytes per row, never below).
  """
  return itemsize * (2 * rows * (d + dv) + block_size * (d + dv) + rows * block_size) + 9 * rows


def fit_rows(rows: int, fits, minimum: int) -> int:
  """``rows`` halved until ``fits(rows)`` or ``minimum``."""
  while rows > minimum and not fits(rows):
    rows //= 2
  return rows
