"""cuDNN flash attention for MSA's visibility rule, for the layout a model produces.

Sequence b's queries sit at consecutive positions ending at ``kv_lengths[b] - 1``, padding
(``p < 0``) after them (``bottom_right``). Two cuDNN calls merged by their LSEs: the queries
against the cached prefix (no causal mask, ``key_value_seq_lengths`` = prefix length) and
against their own chunk (cuDNN's causal mask, which is aligned top-left). bfloat16/float16,
head dim <= 128 (``supports``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msa_jax import schedule as sched

# cuDNN flash attention's supported inputs (Hopper/Ampere): half-precision, head dim <= 128.
_DTYPES = (jnp.bfloat16, jnp.float16)
_MAX_HEAD_DIM = 128


def supports(q, k, v) -> bool:
  return (q.dtype in _DTYPES and q.shape[3] <= _MAX_HEAD_DIM
          and v.shape[3] == q.shape[3] and q.shape[3] % 8 == 0)


def layout(q_positions, kv_lengths):
  """Per sequence: queries n (positions >= 0) and the prefix before them, kv_lengths - n."""
  n = jnp.sum(q_positions >= 0, axis=1).astype(jnp.int32)
  return n, (kv_lengths - n).astype(jnp.int32)


def bottom_right(q_positions, kv_lengths):
  """True iff every sequence's queries sit at prefix + t (t < n), padding (-1...) after."""
  n, prefix = layout(q_positions, kv_lengths)
  t = jnp.arange(q_positions.shape[1], dtype=jnp.int32)[None, :]
  ok = jnp.where(t < n[:, None], q_positions == prefix[:, None] + t, q_positions < 0)
  return jnp.all(ok) & jnp.all(prefix >= 0)


def attention(q, k, v, q_positions, kv_lengths, scale):
  """cuDNN flash attention for the bottom-right layout: prefix part + own-chunk part."""
  b, t, hq, _ = q.shape
  s, g = k.shape[1], k.shape[2]
  n, prefix = layout(q_positions, kv_lengths)
  rows = jnp.arange(t, dtype=jnp.int32)[None, :]
  # The chunk's own keys and values, in chunk order (rows past n are zeroed: never garbage).
  at = jnp.clip(prefix[:, None] + rows, 0, s - 1)
  own_valid = (rows < n[:, None])[:, :, None, None]
  k_own = jnp.where(own_valid, jnp.take_along_axis(k, at[:, :, None, None], axis=1), 0)
  v_own = jnp.where(own_valid, jnp.take_along_axis(v, at[:, :, None, None], axis=1), 0)
  # cuDNN needs at least one query and key per sequence; empty rows are dropped below.
  one = jnp.maximum(n, 1)
  attend = lambda k_, v_, kv_len, causal: jax.nn.dot_product_attention(
      q, k_, v_, scale=scale, is_causal=causal, query_seq_lengths=one,
      key_value_seq_lengths=kv_len, implementation="cudnn", return_residual=True)
  own_out, own_lse = attend(k_own, v_own, one, True)
  pre_out, pre_lse = attend(k, v, jnp.maximum(prefix, 1), False)
  query_valid = rows < n[:, None]  # [B, T]
  valid = jnp.stack([jnp.broadcast_to(query_valid[:, :, None], (b, t, g)),
                     jnp.broadcast_to((query_valid & (prefix[:, None] > 0))[:, :, None],
                                      (b, t, g))], axis=-1)
  partial_out = jnp.stack([own_out, pre_out])
  partial_lse = jnp.stack([own_lse, pre_lse]).astype(jnp.float32)
  return sched.combine(partial_out, partial_lse, valid, q.dtype)[0]
