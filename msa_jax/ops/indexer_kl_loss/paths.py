"""``indexer_kl_loss``'s paths (rows of ``msa_jax.dispatch``): the reference's value, and
for the Pallas implementations a ``custom_vjp`` whose gradient runs the sparse attention
kernels (``_kl_grads``): autodiff of the reference would scatter-add every gathered key into
k_idx, which serialises on the GPU, and keep every chunk's gathered keys for the backward.

Each takes ``q, k, q_idx, k_idx`` (contiguous), the selection, positions and lengths.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

from msa_jax import reference
from msa_jax.source import KV


def xla(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths, *, block_size, scale,
        interpret):
  del interpret
  return reference.indexer_kl_loss(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths,
                                   block_size=block_size, scale=scale)


def gpu(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths, *, block_size, scale,
        interpret):
  return pallas(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths, block_size, scale,
                "pallas_gpu", interpret)


def tpu(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths, *, block_size, scale,
        interpret):
  return pallas(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths, block_size, scale,
                "pallas_tpu", interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def pallas(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths, block_size,
                    scale, impl, interpret):
  return reference.indexer_kl_loss(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths,
                                   block_size=block_size, scale=scale)


def _pallas_fwd(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths, block_size,
                   scale, impl, interpret):
  loss = pallas(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths,
                         block_size, scale, impl, interpret)
  return loss, (q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths)


def _pallas_bwd(block_size, scale, impl, interpret, residuals, g_loss):
  q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths = residuals
  dq_idx, dk_idx = _kl_grads(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths,
                             block_size=block_size, scale=scale, impl=impl, interpret=interpret)
  return (jnp.zeros_like(q), jnp.zeros_like(k), (g_loss * dq_idx).astype(q_idx.dtype),
          (g_loss * dk_idx).astype(k_idx.dtype), None, None, None)


pallas.defvjp(_pallas_fwd, _pallas_bwd)


def _kl_grads(q, k, q_idx, k_idx, block_indices, q_positions, kv_lengths, *, block_size,
              scale, impl, interpret):
  """(d/d q_idx, d/d k_idx) of the indexer KL (float32) from two sparse attentions.

  With c = 1/(N*G*sqrt(Di)) the gradients are (docs/msa.md §5), over the support:
    ``dq_idx[t,g] = c * sum_j (P_idx - P_teacher)[t,g,j] * k_idx[j]``
    ``dk_idx[j] = c * sum_{t,g} (P_idx - P_teacher)[t,g,j] * q_idx[t,g]``.
  Attend with the index queries (one head per group, keys k_idx, scale 1/sqrt(Di)) and with
  the main queries (q, k, ``scale``: each head's softmax on the same support), both with
  values k_idx: the outputs are sum_j P k_idx[j], so dq_idx is c times the index output minus
  the group mean of the main outputs. dk_idx is the dV of the index attention for the output
  gradient ``c * q_idx`` minus that of the main attention for ``c * q_idx / (Hq/G)`` given to
  every head of the group (which averages the heads): the KV-outer backward kernel over the
  selection's inverse map, each block's dV accumulated in one place. Kernels run in q's dtype
  (float32 accumulation inside).
  """
  b, t, hq, _ = q.shape
  g, di = k.shape[2], q_idx.shape[-1]
  cast = lambda x: lax.stop_gradient(x).astype(q.dtype)
  q, k, q_idx = cast(q), cast(k), cast(q_idx)
  k_idx_g = jnp.broadcast_to(cast(k_idx)[:, :, None, :], (b, k_idx.shape[1], g, di))
  from msa_jax import dispatch  # (imported here: the table lists this module)
  sparse = dispatch.path("sparse_attention", impl, t)  # differentiable over contiguous K/V
  attend = lambda q, k, v, scale: sparse(q, KV(k=k, v=v, lengths=kv_lengths), block_indices,
                                         q_positions, block_size=block_size, scale=scale,
                                         interpret=interpret)
  (out_idx, lse_idx), vjp_idx = jax.vjp(
      lambda v: attend(q_idx, k_idx_g, v, 1.0 / math.sqrt(di)), k_idx_g)
  (out_main, lse_main), vjp_main = jax.vjp(lambda v: attend(q, k, v, scale), k_idx_g)
  supported = (lse_idx > -jnp.inf)[..., None]  # [B, T, G, 1]: a non-empty support
  n = jnp.sum(jnp.any(supported[..., 0], axis=-1))  # queries counted by the loss
  c = 1.0 / (jnp.maximum(n, 1) * g * math.sqrt(di)).astype(jnp.float32)
  teacher = jnp.mean(out_main.astype(jnp.float32).reshape(b, t, g, hq // g, di), axis=3)
  dq_idx = jnp.where(supported, c * (out_idx.astype(jnp.float32) - teacher), 0.0)
  do_idx = jnp.where(supported, c * q_idx.astype(jnp.float32), 0.0)
  (dv_idx,) = vjp_idx((do_idx.astype(q.dtype), jnp.zeros_like(lse_idx)))
  do_main = jnp.repeat(do_idx / (hq // g), hq // g, axis=2).astype(q.dtype)
  (dv_main,) = vjp_main((do_main, jnp.zeros_like(lse_main)))
  dk_idx = jnp.sum(dv_idx.astype(jnp.float32) - dv_main.astype(jnp.float32), axis=2)
  return dq_idx, dk_idx
