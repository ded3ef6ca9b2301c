"""Grouped matmul of the MoE layers: rows sorted by expert times each expert's weight.

``grouped_matmul(x, w, group_sizes)`` = ``jax.lax.ragged_dot``: rows ``[start_e, end_e)`` of
``x [P, K]`` (``group_sizes [E]`` consecutive runs) times ``w[e] [K, N]``. XLA's GPU
``ragged_dot`` is slow (a few TFLOP/s for M3's experts on an H200, benchmarks/NOTES.md; at
decode it reads every expert's weights), so on GPUs:

* few rows (decode: ``P <= SMALL_ROWS``): a Pallas (Triton) kernel over tiles of 16 rows,
  each tile holding rows of one expert, so only the routed experts' weights are read, once
  per tile;
* many rows (prefill) in half precision on Hopper: JAX's Mosaic GPU ``ragged_dot`` (TMA +
  wgmma); elsewhere the same Triton kernel with 64-row tiles.

Every path returns ``[P, N]`` in x's dtype with float32 accumulation. Rows past the groups
(``sum(group_sizes) < P``: rows routed to another device's experts) come out as zeros or
garbage, never read. MXFP8 weights (``scales=``, ``models.mxfp8``) are dequantised inside the
few-row kernel, 32 rows of K at a time, so decode reads 8-bit weights; the other paths
dequantise the layer's experts before the matmul.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from models import mxfp8

SMALL_ROWS = 1024
_MOSAIC_DTYPES = (jnp.bfloat16, jnp.float16)
# The many-row kernel on Hopper: "mosaic" (default) or "triton" (64-row tiles).
PREFILL_KERNEL = os.environ.get("MSA_MOE_PREFILL", "mosaic")


def grouped_matmul(x, w, group_sizes, *, scales=None, implementation="xla", interpret=False,
                   layout=None):
  """``x [P, K]`` (rows grouped by expert, ``group_sizes [E]`` rows each, in order) times
  ``w [E, K, N]`` -> ``[P, N]``. ``scales``: w is MXFP8 values with these E8M0 scales
  ``[E, ceil(K/32), N]``. ``layout``: the ``tile_layout(group_sizes, P, 16)`` of the
  few-row kernel, when the caller runs several matmuls on the same rows (computed once)."""
  implementation = resolve(implementation, interpret)
  p = x.shape[0]
  if implementation == "pallas_gpu" and p <= SMALL_ROWS:
    return tiled(x, w, group_sizes, scales=scales, tile_rows=16, interpret=interpret,
                 layout=layout)
  if scales is not None:
    w = mxfp8.dequantize(w, scales, x.dtype)
  if implementation != "pallas_gpu":
    return lax.ragged_dot(x, w, group_sizes)
  if not interpret and PREFILL_KERNEL == "mosaic" and _mosaic_supports(x, w):
    return _mosaic(x, w, group_sizes)
  return tiled(x, w, group_sizes, tile_rows=64, interpret=interpret)


def resolve(implementation, interpret=False) -> str:
  """None -> "pallas_gpu" on GPUs (or in interpret mode), else "xla" (as msa_jax does)."""
  if implementation is None:
    gpu = interpret or jax.default_backend() == "gpu"
    return "pallas_gpu" if gpu else "xla"
  return implementation


def _mosaic_supports(x, w) -> bool:
  if x.dtype not in _MOSAIC_DTYPES or w.dtype != x.dtype:
    return False
  try:
    kind = jax.devices()[0].device_kind
  except RuntimeError:
    return False
  k, n = w.shape[1], w.shape[2]
  hopper = any(name in kind for name in ("H100", "H200", "H800", "H20"))
  return hopper and k % 64 == 0 and n % 128 == 0


def _mosaic(x, w, group_sizes):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=group_sizes.astype(jnp.int32),
                                    block_m=128, block_n=128, block_k=64,
                                    max_concurrent_steps=4, grid_block_n=1)


# ----------------------------------------------------------------------------- tiled (Triton)


def tile_layout(group_sizes, num_rows: int, tile_rows: int):
  """Rows of each expert padded to whole tiles of ``tile_rows``.

  Returns (row [P]: where sorted row j lands in the padded layout, past its end for rows past
  the groups; tile_expert [num_tiles]: the expert of each tile, -1 past the last used tile).
  ``num_tiles`` is a static bound: ``sum_e ceil(g_e / tile) <= P / tile + min(E, P)``.
  """
  e = group_sizes.shape[0]
  num_tiles = num_rows // tile_rows + min(e, num_rows) + 1
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  tiles = (sizes + tile_rows - 1) // tile_rows
  tile_ends = jnp.cumsum(tiles)
  j = jnp.arange(num_rows, dtype=jnp.int32)
  # "compare_all": one fused comparison (the default "scan" is a loop: on GPUs, a launch
  # and a host round trip per step, inside every decode step).
  expert = jnp.searchsorted(ends, j, side="right", method="compare_all")
  row = (tile_ends - tiles)[expert] * tile_rows + (j - (ends - sizes)[expert])
  row = jnp.where(j < ends[-1], row, num_tiles * tile_rows)
  tile_expert = jnp.searchsorted(tile_ends, jnp.arange(num_tiles, dtype=jnp.int32),
                                 side="right", method="compare_all")
  tile_expert = jnp.where(tile_expert < e, tile_expert, -1).astype(jnp.int32)
  # Materialise the layout: XLA would otherwise fuse these index computations (cumsums, the
  # searches) into every gather/scatter that uses them and redo them for each element moved
  # (on an H200 that made three such fusions 90% of an M3 decode step).
  row, tile_expert = lax.optimization_barrier((row, tile_expert))
  return row, tile_expert, num_tiles


def _kernel(expert_ref, x_ref, w_ref, *refs, block_k, scaled):
  from jax.experimental import pallas as pl
  scale_ref, o_ref = refs if scaled else (None, *refs)
  i, n = pl.program_id(0), pl.program_id(1)
  e = expert_ref[i]
  tile_rows, block_n = o_ref.shape
  rows = pl.ds(i * tile_rows, tile_rows)
  cols = pl.ds(n * block_n, block_n)

  @pl.when(e >= 0)
  def _():
    def body(i, acc):
      ks = pl.ds(i * block_k, block_k)
      xs = x_ref[rows, ks]
      ws = w_ref[e, ks, cols].astype(xs.dtype)
      part = lax.dot_general(xs, ws, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
      if scaled:  # block_k = 32 rows of K share one scale per column
        part = part * mxfp8.factors(scale_ref[e, pl.ds(i, 1), cols])
      return acc + part

    acc = lax.fori_loop(0, x_ref.shape[1] // block_k, body,
                        jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  @pl.when(e < 0)
  def _():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def tiled(x, w, group_sizes, *, scales=None, tile_rows=16, block_n=None, block_k=None,
          num_warps=4, num_stages=3, interpret=False, layout=None):
  """The grouped matmul as a Pallas (Triton) kernel over tiles of one expert's rows: a grid of
  (tiles, N / block_n) programs, each reading its expert's ``[K, block_n]`` slice of w in
  ``block_k`` rows per step (32 with MXFP8 ``scales``: one scale row per step)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltr
  p, k = x.shape
  n = w.shape[2]
  if layout is None:
    layout = tile_layout(group_sizes, p, tile_rows)
  row, tile_expert, num_tiles = layout
  if scales is not None:
    block_k = mxfp8.BLOCK if k % mxfp8.BLOCK == 0 else None
  elif block_k is None:
    block_k = next((b for b in (128, 64, 32, 16) if k % b == 0), None)
  if block_n is None:  # enough programs to fill the GPU (two waves of 132 SMs)
    block_n = 128 if num_tiles * n // 128 >= 264 else 64
    block_n = next((b for b in (block_n, 64, 32, 16) if n % b == 0), None)
  # The kernel slices w whole, with int32 offsets: a stack of 2^31 elements or more can
  # overflow them (M3's 128 experts on one device hit an illegal address). With experts
  # sharded (expert parallelism) each device's stack is far below it.
  if block_k is None or block_n is None or w.size >= 2**31:  # what the tiles cannot cover
    if scales is not None:
      w = mxfp8.dequantize(w, scales, x.dtype)
    return lax.ragged_dot(x, w, group_sizes)
  x_tiles = jnp.zeros((num_tiles * tile_rows, k), x.dtype).at[row].set(x, mode="drop")
  operands = (tile_expert, x_tiles, w) + (() if scales is None else (scales,))
  out = pl.pallas_call(
      functools.partial(_kernel, block_k=block_k, scaled=scales is not None),
      grid=(num_tiles, n // block_n),
      # x and w whole (their widths need not be powers of two); the kernel slices them.
      in_specs=[pl.BlockSpec()] * len(operands),
      out_specs=pl.BlockSpec((tile_rows, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((num_tiles * tile_rows, n), x.dtype),
      compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="moe_grouped_matmul",
  )(*operands)
  return out.at[row].get(mode="fill", fill_value=0)
