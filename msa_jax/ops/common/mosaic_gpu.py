"""What the Mosaic GPU (Hopper: TMA + wgmma) kernels share: hardware constants, the producer
side of a shared-memory ring, compiler parameters and the interpret-mode switch."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from msa_jax.ops.common import interpreter_shims

WGMMA_ROWS = 64  # rows of one warpgroup's wgmma tile (M)
SMEM_BYTES = 227 * 1024  # Hopper: shared memory one CTA may use
LOG2E = math.log2(math.e)
NO_KEYS = -1e30  # floor for a row max, so rows without a visible key give p = 0, not NaN


def produce_ring(n, stages: int, consumed, load):
  """The producer side of a ring of ``stages`` shared-memory slots (the union and index
  kernels): for item i < n, wait until slot ``i % stages`` was released on ``consumed``
  (from its second use on), then ``load(i, slot)``; at the end, wait out the last releases,
  so no barrier phase goes unobserved."""
  slot_of = lambda i: lax.rem(i, jnp.int32(stages))

  @pl.loop(0, n)
  def _(i):
    @pl.when(i >= stages)
    def _():
      plgpu.barrier_wait(consumed.at[slot_of(i)])

    load(i, slot_of(i))

  @pl.loop(jnp.maximum(n - stages, 0), n)
  def _(i):
    plgpu.barrier_wait(consumed.at[slot_of(i)])


def stage_output(o, m, l, *, q_tile, lse_tile, scale, dtype):
  """The end of an exact softmax: ``o = P V`` unnormalised, ``m`` the rows' score max and
  ``l`` their sums of ``exp((s - m) * scale)``. Normalises O, stages it in the q tile (its q
  rows are dead) and the LSE (``-inf`` for rows without a visible key) in its buffer, and
  makes both visible to the TMA engine."""
  has_keys = l != 0  # NaN (a visible NaN/Inf logit) is not "no keys"
  l_safe = jnp.where(has_keys, l, 1.0)
  o = o / lax.broadcast_in_dim(l_safe, o.shape, [0])
  lse = jnp.where(has_keys, m * scale + jnp.log(l_safe), -jnp.inf)
  q_tile[...] = o.astype(dtype)
  lse_tile[...] = lse
  plgpu.commit_smem()


def compiler_params():
  """approx_math, and no shared memory reserved for cross-warp reductions: the attention
  kernels' reductions (softmax rows in the WGMMA layout) stay within a warp, and the 2 KB
  Mosaic reserves by default is what a third q slot lacks at M3 shapes."""
  params = dict(approx_math=True)
  if "reduction_scratch_bytes" in {f.name for f in dataclasses.fields(plgpu.CompilerParams)}:
    params["reduction_scratch_bytes"] = 0
  return plgpu.CompilerParams(**params)


def num_sms() -> int:
  """Streaming multiprocessors of the first device (persistent grids: one CTA each)."""
  device = jax.devices()[0]
  return int(getattr(device, "core_count", 0) or 132) if device.platform == "gpu" else 2


def interpret_params(interpret):
  """False/None -> compiled; True -> default GPU interpret params; else passed through."""
  if interpret is False or interpret is None:
    return None
  interpreter_shims.install()
  if interpret is True:
    params_cls = interpret_params_class()
    if params_cls is None:
      raise NotImplementedError("this jax has no Mosaic GPU interpret mode")
    return params_cls()
  return interpret


def interpret_params_class():
  """The Mosaic GPU interpret-params class of this jax (None if it has no GPU interpreter)."""
  for name in ("InterpretGPUParams", "InterpretParams"):  # public in jax 0.11.2
    if hasattr(plgpu, name):
      return getattr(plgpu, name)
  try:  # jax 0.10.2: private only
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError:
    return None
  return InterpretGPUParams
