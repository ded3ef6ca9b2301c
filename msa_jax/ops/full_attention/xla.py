"""Flash attention written in ``jax.numpy`` with MSA's visibility rule: any backend, any dtype.

Query chunks of ``q_chunk``, each an online softmax over key chunks of ``k_chunk`` up to the
last key any of its queries sees; memory ``O(B * Hq * q_chunk * k_chunk)``, no ``[T, S]``
score matrix. Differentiable (a scan with a cond, not a loop with a dynamic bound).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from msa_jax import reference


def flash_attention(q, k, v, q_positions, kv_lengths, scale, q_chunk, k_chunk):
  b, t, hq, d = q.shape
  s, g, dv = k.shape[1], k.shape[2], v.shape[3]
  hpg = hq // g
  cq, ck = min(q_chunk, t), min(k_chunk, s)
  nq, nk = reference.cdiv(t, cq), reference.cdiv(s, ck)
  pad_t, pad_s = nq * cq - t, nk * ck - s
  q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
  pos = jnp.pad(q_positions, ((0, 0), (0, pad_t)), constant_values=-1)
  k = jnp.pad(k, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  qs = jnp.moveaxis(q.reshape(b, nq, cq, g, hpg, d), 1, 0)  # [nq, B, cq, G, hpg, D]
  ps = jnp.moveaxis(pos.reshape(b, nq, cq), 1, 0)  # [nq, B, cq]

  def one_chunk(args):
    qc, pc = args
    # Key chunks past the last key any query of this chunk sees are never read.
    last = jnp.max(jnp.minimum(pc, kv_lengths[:, None] - 1))
    num_chunks = jnp.where(last >= 0, last // ck + 1, 0)

    def step(carry, j):
      return lax.cond(j < num_chunks, lambda: attend(j, *carry), lambda: carry), None

    def attend(j, m, l, acc, bad):
      kc = lax.dynamic_slice_in_dim(k, j * ck, ck, axis=1)  # [B, ck, G, D]
      vc = lax.dynamic_slice_in_dim(v, j * ck, ck, axis=1)
      key = j * ck + jnp.arange(ck, dtype=jnp.int32)
      sc = jnp.einsum("bqghd,bkgd->bghqk", qc, kc, precision=precision,
                      preferred_element_type=jnp.float32) * scale
      visible = ((key[None, None, :] <= pc[:, :, None])
                 & (key[None, None, :] < kv_lengths[:, None, None]))  # [B, cq, ck]
      sc = jnp.where(visible[:, None, None], sc, -jnp.inf)
      # Values a query cannot see may hold anything (unwritten cache, NaN): 0 * NaN must not
      # leak through P @ V. Non-finite value rows are zeroed; a query that sees one gets NaN.
      finite = jnp.all(jnp.isfinite(vc), axis=-1)  # [B, ck, G]
      vc = jnp.where(finite[..., None], vc, jnp.zeros((), vc.dtype))
      seen = jnp.any(visible[:, None] & ~jnp.moveaxis(finite, 2, 1)[:, :, None], axis=-1)
      bad = bad | seen[:, :, None]  # [B, G, 1, cq]
      m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      e = jnp.exp(sc - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = l * alpha + jnp.sum(e, axis=-1)
      acc = acc * alpha[..., None] + jnp.einsum(
          "bghqk,bkgd->bghqd", e.astype(v.dtype), vc, precision=precision,
          preferred_element_type=jnp.float32)
      return m_new, l, acc, bad

    init = (jnp.full((b, g, hpg, cq), -jnp.inf, jnp.float32),
            jnp.zeros((b, g, hpg, cq), jnp.float32), jnp.zeros((b, g, hpg, cq, dv), jnp.float32),
            jnp.zeros((b, g, 1, cq), bool))
    # A scan with a cond (not a loop with a dynamic bound) keeps the path differentiable.
    (_, l, acc, bad), _ = lax.scan(step, init, jnp.arange(nk))
    out = acc / jnp.where(l != 0, l, 1.0)[..., None]  # no visible key: 0; NaN l stays NaN
    out = jnp.where(bad[..., None], jnp.nan, out)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, cq, hq, dv)

  out = lax.map(one_chunk, (qs, ps))  # [nq, B, cq, Hq, Dv]
  return jnp.moveaxis(out, 0, 1).reshape(b, nq * cq, hq, dv)[:, :t].astype(q.dtype)
