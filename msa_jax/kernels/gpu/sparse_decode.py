"""Query-outer split-K sparse attention for decode (few queries), GPUs (Triton lowering).

With 1-16 query tokens per sequence there is nothing to share across queries, so the
KV-outer inversion buys nothing: each program takes one (sequence, query, group) and a share
of its selected blocks (split-K, flash-decoding style), keeps an online softmax over them for
the group's ``Hq/G`` heads (16 rows at M3 shapes, the GEMM's M), and writes one partial
output and LSE; ``schedule.combine`` merges the splits. Splits are sized so the grid fills the
GPU even at batch 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from msa_jax.kernels.gpu import tuning

MIN_ROWS = 16  # the smallest GEMM M dimension Triton lowers
TARGET_PROGRAMS = 264  # two waves of an H100/H200's 132 SMs


def supports(q_len: int, heads_per_group: int) -> bool:
  return q_len <= 16 and heads_per_group % MIN_ROWS == 0


def _kernel(ids_ref, pos_ref, kv_len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_size,
            slots_per_split, scale):
  b, t, g, split = (pl.program_id(i) for i in range(4))
  p = pos_ref[b, t]
  kv_len = kv_len_ref[b]
  q = q_ref[...]  # [heads, D]
  heads = q.shape[0]
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  m = jnp.full((heads,), -jnp.inf, jnp.float32)
  l = jnp.zeros((heads,), jnp.float32)
  acc = jnp.zeros((heads, o_ref.shape[-1]), jnp.float32)
  for j in range(slots_per_split):
    blk = ids_ref[b, t, g, split * slots_per_split + j]
    valid = blk >= 0
    blk = jnp.where(valid, blk, 0)
    keys = pl.ds(blk * block_size, block_size)
    k = k_ref[b, keys, g, :]
    v = v_ref[b, keys, g, :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * scale
    key_pos = blk * block_size + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
    s = jnp.where(valid & (key_pos <= p) & (key_pos < kv_len), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    e = jnp.exp(s - m_safe[:, None])
    l = l * alpha + jnp.sum(e, axis=1)
    acc = acc * alpha[:, None] + lax.dot_general(
        e.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32)
    m = m_new
  has_keys = l > 0
  o_ref[...] = (acc / jnp.where(has_keys, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), -jnp.inf)


def sparse_decode_partials(q, k, v, block_indices, q_positions, kv_lengths, *, block_size,
                           scale, num_splits=None, num_warps=None, num_stages=None,
                           interpret=False):
  """Returns partial_out [splits,B,T,Hq,Dv], partial_lse [splits,B,T,Hq]; every slot written.

  ``block_indices`` must already hold -1 for slots to skip (invalid or repeated ids).
  """
  cfg = tuning.config("decode", num_warps=num_warps, num_stages=num_stages)
  b, t, hq, d = q.shape
  g = k.shape[2]
  dv = v.shape[-1]
  heads = hq // g
  topk = block_indices.shape[-1]
  if num_splits is None:
    num_splits = max(1, min(topk, TARGET_PROGRAMS // (b * t * g)))
  slots_per_split = -(-topk // num_splits)
  num_splits = -(-topk // slots_per_split)
  ids = jnp.pad(block_indices, ((0, 0), (0, 0), (0, 0), (0, num_splits * slots_per_split - topk)),
                constant_values=-1)
  kernel = functools.partial(_kernel, block_size=block_size, slots_per_split=slots_per_split,
                             scale=scale)
  whole = pl.BlockSpec()
  partial_out, partial_lse = pl.pallas_call(
      kernel,
      grid=(b, t, g, num_splits),
      in_specs=[whole, whole, whole,
                pl.BlockSpec((None, None, None, heads, d), lambda bi, ti, gi, si: (bi, ti, gi, 0, 0)),
                whole, whole],
      out_specs=[
          pl.BlockSpec((None, None, None, None, heads, dv),
                       lambda bi, ti, gi, si: (si, bi, ti, gi, 0, 0)),
          pl.BlockSpec((None, None, None, None, heads), lambda bi, ti, gi, si: (si, bi, ti, gi, 0)),
      ],
      out_shape=(jax.ShapeDtypeStruct((num_splits, b, t, g, heads, dv), q.dtype),
                 jax.ShapeDtypeStruct((num_splits, b, t, g, heads), jnp.float32)),
      compiler_params=pltr.CompilerParams(num_warps=cfg["num_warps"],
                                          num_stages=cfg["num_stages"]),
      interpret=interpret,
      name="msa_sparse_decode",
  )(ids, q_positions, kv_lengths, q.reshape(b, t, g, heads, d), k, v)
  return (partial_out.reshape(num_splits, b, t, hq, dv),
          partial_lse.reshape(num_splits, b, t, hq))
