"""Full (dense) attention with MSA's visibility rule for TPUs (Pallas, Mosaic TPU).

Flash attention whose mask comes from data, not from a static pattern: query row ``r`` at
position ``p_r`` sees key ``j`` iff ``j <= p_r`` and ``j < kv_lengths[b]``, so one kernel serves
prefill, chunked prefill over a cache, ragged batches and padding (``p = -1``). Splash
attention's masks are static, so they cannot express per-sequence offsets.

Layout: the group's query heads are rows, ``[B, G, T * Hq/G, D]`` (row = position x head), and
K/V are head-major ``[B, G, S, D]``, so every tile is a contiguous 2-D block. Grid
``(B, G, T / tq, S / tk)`` with the key tiles innermost: a program folds one ``[tk, D]`` K/V
tile into the online-softmax state (running max, sum and ``[rows, Dv]`` accumulator in VMEM
scratch) of one tile of ``tq`` positions x ``Hq/G`` heads. The largest position of each query
tile and ``kv_lengths`` arrive by scalar prefetch: key tiles past the last key any row of the
tile sees skip the math, and their index map repeats the last needed tile, so the pipeline
fetches nothing new for them. Values a row cannot see never reach it, even as NaN or Inf
(``ops/common/masking.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from msa_jax import reference
from msa_jax.ops.common import masking

ROWS = 256  # query rows (positions x heads of a group) per tile
KEYS = 512  # keys per tile


def _kernel(last_ref, kv_len_ref,  # scalar prefetch
            pos_ref, q_ref, k_ref, v_ref,  # inputs
            o_ref,  # output
            m_sc, l_sc, acc_sc, bad_sc,  # scratch
            *, keys, scale):
  b, qi, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
    bad_sc[...] = jnp.zeros(bad_sc.shape, jnp.float32)

  kv_len = kv_len_ref[b]

  @pl.when(j * keys <= last_ref[b, qi])
  def _():
    q = q_ref[...]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    key_col = j * keys + lax.broadcasted_iota(jnp.int32, (keys, 1), 0)
    v, bad = masking.clean_values(v_ref[...], key_col, kv_len)
    s = lax.dot_general(q, k_ref[...], (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * scale
    key_pos = j * keys + lax.broadcasted_iota(jnp.int32, (1, keys), 1)
    visible = (key_pos <= pos_ref[...]) & (key_pos < kv_len)  # [rows, 1] vs [1, keys]
    s = jnp.where(visible, s, -jnp.inf)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32)
    m_sc[...] = m_new
    sees_bad = jnp.max(jnp.where(visible, bad.reshape(1, keys), 0.0), axis=1, keepdims=True)
    bad_sc[...] = jnp.maximum(bad_sc[...], sees_bad)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    o, _ = masking.finalize(acc_sc[...], m_sc[...], l_sc[...], bad_sc[...])
    o_ref[...] = o.astype(o_ref.dtype)


def flash_attention(q, k, v, q_positions, kv_lengths, *, scale, rows=ROWS, keys=KEYS,
                    interpret=False):
  """``q [B,T,Hq,D]`` over ``k [B,S,G,D]``, ``v [B,S,G,Dv]`` with MSA's visibility rule.

  ``q_positions [B,T]`` (-1 = padding) and ``kv_lengths [B]`` int32. Returns ``[B,T,Hq,Dv]``
  in q's dtype; a query without a visible key gets 0.
  """
  b, t, hq, d = q.shape
  s, g, dv = k.shape[1], k.shape[2], v.shape[3]
  heads = hq // g
  tq = max(1, rows // heads)
  tq = t if tq >= t else max(8, tq // 8 * 8)  # whole sublane tiles of rows
  tk = min(keys, reference.cdiv(s, 128) * 128)
  t_pad, s_pad = reference.cdiv(t, tq) * tq, reference.cdiv(s, tk) * tk
  nq, nk = t_pad // tq, s_pad // tk
  pos = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, t_pad - t)), constant_values=-1)
  kv_lengths = kv_lengths.astype(jnp.int32)
  # The last key any row of each query tile sees (-1: none).
  last = jnp.minimum(jnp.max(pos.reshape(b, nq, tq), axis=2), kv_lengths[:, None] - 1)

  def by_group(x, length, width):  # [B, L, G(, H), W] -> [B, G, L * H, W], padded to length
    x = x.reshape(b, x.shape[1], g, -1, width)
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3, 4).reshape(b, g, -1, width)

  q_rows = by_group(q, t_pad, d)
  k_hm, v_hm = by_group(k, s_pad, d), by_group(v, s_pad, dv)
  pos_rows = jnp.broadcast_to(pos[:, :, None], (b, t_pad, heads)).reshape(b, t_pad * heads, 1)
  r = tq * heads

  def kv_index(bi, gi, qi, j, last_ref, _):
    return bi, gi, jnp.minimum(j, jnp.maximum(last_ref[bi, qi], 0) // tk), 0

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, g, nq, nk),
      in_specs=[
          pl.BlockSpec((None, r, 1), lambda bi, gi, qi, j, *_: (bi, qi, 0)),
          pl.BlockSpec((None, None, r, d), lambda bi, gi, qi, j, *_: (bi, gi, qi, 0)),
          pl.BlockSpec((None, None, tk, d), kv_index),
          pl.BlockSpec((None, None, tk, dv), kv_index),
      ],
      out_specs=pl.BlockSpec((None, None, r, dv), lambda bi, gi, qi, j, *_: (bi, gi, qi, 0)),
      scratch_shapes=[pltpu.VMEM((r, 1), jnp.float32), pltpu.VMEM((r, 1), jnp.float32),
                      pltpu.VMEM((r, dv), jnp.float32), pltpu.VMEM((r, 1), jnp.float32)],
  )
  out = pl.pallas_call(
      functools.partial(_kernel, keys=tk, scale=scale),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, g, t_pad * heads, dv), q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="msa_full_attention_flash",
  )(last, kv_lengths, pos_rows, q_rows, k_hm, v_hm)
  out = out.reshape(b, g, t_pad, heads, dv).transpose(0, 2, 1, 3, 4)
  return out[:, :t].reshape(b, t, hq, dv)
