"""Shared memory of the Triton kernels: what a launch asks for, and what the card offers.

A Triton kernel whose tiles need more shared memory than the card has fails only when XLA
loads it, with ``RESOURCE_EXHAUSTED: Shared memory size limit exceeded``. ``recorded()`` reads
the number Triton computed for every Pallas/Triton kernel lowered inside it (on a GPU, with a
jaxlib that compiles Triton from Python), so tests and probes can check launch parameters
against ``limit()`` before anything runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect

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


@dataclasses.dataclass(frozen=True)
class Launch:
  name: str
  num_warps: int
  num_stages: int
  smem_bytes: int


@contextlib.contextmanager
def recorded():
  """Yields a list that collects a ``Launch`` per Triton kernel lowered inside the block.

  Lowering (``jax.jit(f).lower(...)``) is enough: Pallas compiles the Triton module while
  lowering. Raises ``RuntimeError`` where that does not happen (CPU, or a jaxlib that leaves
  Triton to XLA).
  """
  from jax._src.lib import triton  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "gpu" or not hasattr(triton, "compile"):
    raise RuntimeError("Triton kernels compile while lowering only on a CUDA GPU with a "
                       "jaxlib newer than 0.10.2")
  launches: list[Launch] = []
  compile_fn = triton.compile

  def compile_and_record(platform, module, arch_name, *, num_warps, num_ctas, num_stages):
    result = compile_fn(platform, module, arch_name, num_warps=num_warps, num_ctas=num_ctas,
                        num_stages=num_stages)
    # The kernel's name is a local of Pallas's lowering rule, our caller.
    name = inspect.currentframe().f_back.f_locals.get("name", "?")
    launches.append(Launch(str(name), num_warps, num_stages, int(result.smem_bytes)))
    return result

  triton.compile = compile_and_record
  try:
    yield launches
  finally:
    triton.compile = compile_fn
