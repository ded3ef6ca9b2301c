"""MXFP8 weights kept in 8 bits on the device (the format of MiniMax-M3-MXFP8's checkpoint).

A weight ``w [..., K, N]`` (this package's ``[in, out]`` layout) is stored as
``float8_e4m3fn`` values and one ``uint8`` E8M0 scale per 32 consecutive input rows:
``w[..., k, n] = values[..., k, n] * 2 ** (scale[..., k // 32, n] - 127)``. The checkpoint
holds the transpose (``[out, in]`` weights, ``[out, in / 32]`` scales).

``dequantize`` rebuilds the weight in a compute dtype (exact: a power-of-two scale times an
E4M3 value is representable in bfloat16 and float32); ``quantize`` is the rounding the
checkpoint writer uses (the block's largest magnitude maps to at most E4M3's 448).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

BLOCK = 32  # input rows per scale
BIAS = 127  # E8M0 exponent bias
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
VALUE_DTYPE = ml_dtypes.float8_e4m3fn
SCALE_DTYPE = np.uint8


def scale_shape(shape) -> tuple:
  """The scale's shape for a weight of ``shape [..., K, N]``."""
  *lead, k, n = shape
  return (*lead, -(-k // BLOCK), n)


def _xp(x):
  """numpy for host arrays (the checkpoint reader and writer), jax.numpy otherwise."""
  return np if isinstance(x, np.ndarray) else jnp


def quantize(w) -> tuple:
  """``w [..., K, N]`` -> (values float8_e4m3fn [..., K, N], scales uint8 [..., ceil(K/32), N]):
  per block of 32 input rows, the smallest power of two that brings the block's largest
  magnitude within E4M3's range. NumPy in, NumPy out; otherwise jax arrays."""
  xp = _xp(w)
  w = w.astype(xp.float32)
  *lead, k, n = w.shape
  blocks = -(-k // BLOCK)
  padded = xp.pad(w, [(0, 0)] * len(lead) + [(0, blocks * BLOCK - k), (0, 0)])
  grouped = padded.reshape(*lead, blocks, BLOCK, n)
  amax = xp.max(xp.abs(grouped), axis=-2)
  exponent = xp.where(amax > 0, xp.ceil(xp.log2(xp.maximum(amax, 1e-30) / E4M3_MAX)), 0.0)
  scales = (xp.clip(exponent, -BIAS, 127) + BIAS).astype(SCALE_DTYPE)
  values = grouped / factors(scales)[..., None, :]
  values = values.reshape(*lead, blocks * BLOCK, n)[..., :k, :].astype(VALUE_DTYPE)
  return values, scales


def factors(scales):
  """E8M0 scales as float32 powers of two ``2^(scale - 127)``, built from their bits (exact,
  where ``exp2`` on some backends is not): the scale is float32's exponent field; 0 is
  2^-127, float32's largest subnormal power of two."""
  xp = _xp(scales)
  bits = scales.astype(xp.int32)
  bits = xp.where(bits > 0, bits << 23, 1 << 22)
  if xp is np:
    return bits.view(np.float32)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def dequantize(values, scales, dtype=jnp.bfloat16):
  """The weight ``[..., K, N]`` in ``dtype`` from its values and scales (``ValueError`` when
  the scales do not fit the values)."""
  xp = _xp(values)
  if scales.dtype != SCALE_DTYPE or tuple(scales.shape) != scale_shape(values.shape):
    raise ValueError(f"MXFP8 scales must be uint8 {list(scale_shape(values.shape))} for values "
                     f"{list(values.shape)}; got {scales.dtype} {list(scales.shape)}")
  k = values.shape[-2]
  f = xp.repeat(factors(scales), BLOCK, axis=-2)[..., :k, :]
  return (values.astype(xp.float32) * f).astype(dtype)
