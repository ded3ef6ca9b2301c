"""Training losses: token cross-entropy and the whole-causal-context indexer KL (warm-up).

``causal_indexer_kl_loss`` is ``msa_jax.indexer_kl_loss`` with every visible token in the
support: the indexer warm-up of the MSA paper (arXiv 2606.13392) trains the index branch
against the *full* causal main-branch distribution while attention is dense. msa_jax's loss
gathers the selected blocks per query, which with every block selected is a copy of K per query
chunk; this version scores queries chunk by chunk against K directly, under ``jax.checkpoint``,
so forward and backward memory stay O(chunk * S). Tests check it equals msa_jax's loss with all
blocks selected, value and gradient.

``pool="block"`` is an extension beyond the paper: the KL between the teacher's attention mass
per KV block (summed over the block's tokens) and a student distribution over blocks whose
logit is the block's **largest** index score (MSA's max-pool, docs/msa.md §3). It trains the block
ranking that selection uses against the block ranking the recall metrics use, instead of the
token distribution (models/metrics.py: a perfect token-level indexer's selection is not the
main branch's top-k blocks by mass when attention is diffuse).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

KL_QUERY_CHUNK = 256


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
  """Summed next-token cross-entropy and the number of counted tokens.

  logits [B, T, V] (any float dtype, computed in float32), targets int [B, T], mask [B, T]
  (1 = count this token; default all). Returns (sum float32, count float32).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  mask = jnp.ones_like(ce) if mask is None else mask.astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(mask)


def _blocks(x: jax.Array, block_size: int, fill) -> jax.Array:
  """[..., S] -> [..., ceil(S/Bk), Bk], padding S with ``fill``."""
  pad = -x.shape[-1] % block_size
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=fill)
  return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def query_chunks(x: jax.Array, n: int, size: int, fill=0) -> jax.Array:
  """[B, T, ...] -> [n, B, size, ...], padding T up to n * size with ``fill``."""
  pad = n * size - x.shape[1]
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def causal_indexer_kl_loss(q, k, q_idx, k_idx, *, q_positions=None, scale=None,
                           chunk_size: int = KL_QUERY_CHUNK, pool: str = "token",
                           block_size: int = 128):
  """Indexer KL over the whole visible causal context (float32 scalar).

  ``1/(N*G) * sum_{t,g} KL(P_teacher[g,t] || P_idx[g,t])`` over the keys j <= p_t, N = queries
  with a visible key. Teacher: mean over the group's heads of ``softmax(scale * q.k)`` with q, k
  detached; student: ``softmax(q_idx.k_idx / sqrt(Di))``. Gradients reach q_idx and k_idx only.

  Args:
    q: [B, T, Hq, D]; k: [B, S, G, D]; q_idx: [B, T, G, Di]; k_idx: [B, S, Di].
    q_positions: int [B, T] (default bottom-right aligned: S - T + t); p < 0 = padding.
    scale: main-branch logit scale (default 1/sqrt(D)).
    chunk_size: queries per chunk.
    pool: "token" (the paper's loss) or "block" (KL over KV blocks of ``block_size`` tokens:
      teacher = summed mass, student = softmax of the max-pooled index scores; module
      docstring).
  """
  if pool not in ("token", "block"):
    raise ValueError(f"pool must be 'token' or 'block'; got {pool!r}")
  q = jax.lax.stop_gradient(q)
  k = jax.lax.stop_gradient(k)
  b, t, hq, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  hpg = hq // g
  di = q_idx.shape[-1]
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  index_scale = 1.0 / math.sqrt(di)
  if q_positions is None:
    q_positions = jnp.broadcast_to(s_len - t + jnp.arange(t, dtype=jnp.int32), (b, t))
  key_pos = jnp.arange(s_len, dtype=jnp.int32)

  @jax.checkpoint  # keep only the chunk's inputs for the backward, not its [c, S] scores
  def chunk(args):
    pos, qc, qic = args
    c = qc.shape[1]
    vis = key_pos[None, None, None, :] <= pos[:, :, None, None]  # [B,c,1,S]
    rows = jnp.any(vis, axis=-1)[..., 0]  # [B,c]
    s_main = jnp.einsum("bcghd,bsgd->bcghs", qc.reshape(b, c, g, hpg, d), k,
                        preferred_element_type=jnp.float32) * scale
    p_main = jax.nn.softmax(jnp.where(vis[:, :, :, None], s_main, -jnp.inf), axis=-1)
    teacher = jnp.mean(jnp.where(vis[:, :, :, None], p_main, 0.0), axis=3)  # [B,c,G,S]
    s_idx = jnp.einsum("bcgd,bsd->bcgs", qic, k_idx,
                       preferred_element_type=jnp.float32) * index_scale
    s_idx = jnp.where(vis, s_idx, -jnp.inf)
    if pool == "block":  # [.., S] -> [.., nb]: teacher mass summed, index scores max-pooled
      teacher = jnp.sum(_blocks(teacher, block_size, 0.0), axis=-1)
      s_idx = jnp.max(_blocks(s_idx, block_size, -jnp.inf), axis=-1)
      vis = jnp.any(_blocks(vis, block_size, False), axis=-1)
    m = jax.lax.stop_gradient(jnp.max(s_idx, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    lse = m + jnp.log(jnp.maximum(jnp.sum(jnp.exp(s_idx - m), axis=-1, keepdims=True),
                                  1e-30))
    log_p_idx = jnp.where(vis, s_idx - lse, 0.0)
    log_teacher = jnp.log(jnp.where(teacher > 0, teacher, 1.0))
    kl = jnp.sum(jnp.where(teacher > 0, teacher * (log_teacher - log_p_idx), 0.0), axis=-1)
    return jnp.where(rows[..., None], kl, 0.0), rows

  size = min(chunk_size, t)
  n = -(-t // size)
  kl, rows = jax.lax.map(chunk, (query_chunks(q_positions, n, size, -1),
                                 query_chunks(q, n, size), query_chunks(q_idx, n, size)))
  num_queries = jnp.sum(rows)
  return jnp.sum(kl) / (jnp.maximum(num_queries, 1) * g).astype(jnp.float32)
