"""What the GPU and TPU backward passes of sparse attention share: their contract and the
preprocessing of their inputs.

Both ``ops/sparse_attention/gpu_triton_bwd.sparse_attention_bwd`` and
``ops/sparse_attention/tpu_bwd.sparse_attention_bwd`` compute the gradients of
``reference.sparse_attention``'s output with respect to q, k, v:

Args:
  q: [B, T, Hq, D]; k: [B, S, G, D]; v: [B, S, G, Dv] (S need not be a multiple of
    ``block_size``); one float dtype.
  block_indices: int32 [B, T, G, topk] as given to the forward (-1 = none; repeated ids
    count once; out-of-range ids are ignored).
  q_positions: int32 [B, T]; kv_lengths: int32 [B].
  out: [B, T, Hq, Dv] the forward's output; lse: float32 [B, T, Hq] its log-sum-exp
    (-inf for queries without a visible key).
  d_out: [B, T, Hq, Dv] cotangent of ``out``.
  d_lse: optional float [B, T, Hq] cotangent of ``lse`` (d lse / d s = p, so it folds into
    Delta: ``ds = p * (d_out.v - (Delta - d_lse))``).
  block_size, scale: as in the forward.

Returns:
  (dq [B, T, Hq, D], dk [B, S, G, D], dv [B, S, G, Dv]) in the dtypes of q, k, v.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from msa_jax import reference


class Inputs(NamedTuple):
  """The backward's inputs as its kernels take them."""
  block_indices: jax.Array  # int32 [B, T, G, topk]
  valid: jax.Array  # bool [B, T, G, topk]: a live, first occurrence of a block id
  q_positions: jax.Array  # int32 [B, T]
  kv_lengths: jax.Array  # int32 [B]
  lse: jax.Array  # float32 [B, T, Hq]; +inf for queries without a visible key
  delta: jax.Array  # float32 [B, T, Hq]: rowsum(d_out * out) - d_lse
  d_out: jax.Array  # [B, T, Hq, Dv] in q's dtype


def prepare(q, block_indices, q_positions, kv_lengths, out, lse, d_out, d_lse,
            num_blocks: int) -> Inputs:
  """Cast, mask and precompute what both backward passes need (see the module docstring)."""
  block_indices = jnp.asarray(block_indices, jnp.int32)
  lse = lse.astype(jnp.float32)
  # No visible key: lse = -inf; +inf makes p = exp(s - lse) = 0 instead of inf.
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  if d_lse is not None:
    delta = delta - d_lse.astype(jnp.float32)
  return Inputs(block_indices=block_indices,
                valid=reference.valid_block_mask(block_indices, num_blocks),
                q_positions=jnp.asarray(q_positions, jnp.int32),
                kv_lengths=jnp.asarray(kv_lengths, jnp.int32), lse=lse, delta=delta,
                d_out=d_out.astype(q.dtype))
