"""Building blocks of the MiniMax-M3 family (docs/minimax_m3.md §3.1, §3.2, §3.5).

* Gemma RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in float32, weight stored as the
  offset ``w`` (initialised to 0); per-head q/k norms apply it over the head dimension.
* Partial NeoX RoPE: rotate-half over the first ``rotary_dim`` channels (pairs j, j+rd/2),
  ``inv_freq[i] = theta^(-2i/rotary_dim)``; the other channels pass through.
* SwiGLU-OAI: ``min(g, 7) * sigmoid(1.702 * min(g, 7)) * (clip(u, -7, 7) + 1)``.
* ``Linear``: ``x @ W`` with W stored ``[in, out]`` and logical axis names for sharding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def gemma_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


class RMSNorm(nnx.Module):
  """Gemma RMSNorm over the last axis (also used per head: the weight has the head width)."""

  def __init__(self, dim: int, eps: float, *, axis_name: str = "norm"):
    self.eps = eps
    self.weight = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=(axis_name,))

  def __call__(self, x):
    return gemma_rms_norm(x, self.weight[...], self.eps)


def rope(x: jax.Array, positions: jax.Array, *, rotary_dim: int, theta: float) -> jax.Array:
  """Partial NeoX RoPE. x [B, T, heads, D]; positions int [B, T]."""
  half = rotary_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rotary_dim)
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, half]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  x1, x2, rest = x32[..., :half], x32[..., half:rotary_dim], x32[..., rotary_dim:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return rotated.astype(x.dtype)


def swiglu_oai(gate: jax.Array, up: jax.Array, *, alpha: float, limit: float) -> jax.Array:
  g = jnp.minimum(gate.astype(jnp.float32), limit)
  u = jnp.clip(up.astype(jnp.float32), -limit, limit)
  return (g * jax.nn.sigmoid(alpha * g) * (u + 1.0)).astype(gate.dtype)


def scaled_normal(key, shape, fan_in: int, scale: float = 1.0, dtype=jnp.float32):
  """Normal init with std scale / sqrt(fan_in)."""
  return (jax.random.normal(key, shape, jnp.float32) * (scale / math.sqrt(fan_in))).astype(dtype)


class Linear(nnx.Module):
  """y = x @ W (no bias). W is [in, out] (the transpose of a PyTorch/HF weight)."""

  def __init__(self, d_in: int, d_out: int, *, axes: tuple[str, str], rngs: nnx.Rngs,
               init_scale: float = 1.0, param_dtype=jnp.float32):
    self.kernel = nnx.Param(scaled_normal(rngs.params(), (d_in, d_out), d_in, init_scale,
                                          param_dtype), logical_axes=axes)

  def __call__(self, x):
    return jnp.dot(x, self.kernel[...].astype(x.dtype))
