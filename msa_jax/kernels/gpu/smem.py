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
