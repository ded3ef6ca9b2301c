"""Attention of the MiniMax-M3 family (spec/minimax_m3.md §3.4, §3.6).

Full-attention layers and the main branch of MSA layers share one structure:
``q/k/v`` projections, per-head Gemma RMSNorm on q and k, partial NeoX RoPE, GQA with query
head h in group h // (Hq/G), scale 1/sqrt(D), output projection. MSA layers add the index
branch: ``index_q_proj`` (one head per group), ``index_k_proj`` (one shared head), per-head
index norms and the same RoPE, on a stop-gradient input (the index branch never sends
gradient into the backbone; it trains through ``msa_jax.indexer_kl_loss``). Selection and
sparse attention go through ``msa_jax.msa_attention``. Full-attention layers use
``jax.nn.dot_product_attention`` with the same visibility rule (j <= p and j < kv_len).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import msa_jax
from models import cache as cache_lib
from models.layers import Linear, RMSNorm, rope


class Attention(nnx.Module):

  def __init__(self, config, *, sparse: bool, rngs: nnx.Rngs, param_dtype=jnp.float32):
    c = config
    self.config = c
    self.sparse = sparse
    h, hq, g, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    out_scale = 1.0 / math.sqrt(2 * c.num_layers)
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.q_proj = Linear(h, hq * d, axes=("embed", "q_heads"), **kw)
    self.k_proj = Linear(h, g * d, axes=("embed", "kv_heads"), **kw)
    self.v_proj = Linear(h, g * d, axes=("embed", "kv_heads"), **kw)
    self.o_proj = Linear(hq * d, h, axes=("q_heads", "embed"), init_scale=out_scale, **kw)
    self.q_norm = RMSNorm(d, c.rms_norm_eps, axis_name="head_dim")
    self.k_norm = RMSNorm(d, c.rms_norm_eps, axis_name="head_dim")
    if sparse:
      di = c.index_head_dim
      self.index_q_proj = Linear(h, g * di, axes=("embed", "index_heads"), **kw)
      self.index_k_proj = Linear(h, di, axes=("embed", "index_dim"), **kw)
      self.index_q_norm = RMSNorm(di, c.rms_norm_eps, axis_name="index_dim")
      self.index_k_norm = RMSNorm(di, c.rms_norm_eps, axis_name="index_dim")

  def _rope(self, x, positions):
    return rope(x, positions, rotary_dim=self.config.rotary_dim, theta=self.config.rope_theta)

  def __call__(self, h, positions, kv_lengths, k_cache, v_cache, index_cache, *,
               implementation="xla", interpret=False):
    """h [B,T,H]; positions [B,T] (-1 = padding); caches hold kv_lengths valid tokens after
    this step's write. Returns (out [B,T,H], k_cache, v_cache, index_cache)."""
    c = self.config
    b, t, _ = h.shape
    q = self.q_proj(h).reshape(b, t, c.num_heads, c.head_dim)
    k = self.k_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = self.v_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)
    q = self._rope(self.q_norm(q), positions)
    k = self._rope(self.k_norm(k), positions)
    k_cache = cache_lib.write(k_cache, k, positions)
    v_cache = cache_lib.write(v_cache, v, positions)
    k_all, v_all = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    if self.sparse:
      hi = jax.lax.stop_gradient(h)
      iq = self.index_q_proj(hi).reshape(b, t, c.num_kv_heads, c.index_head_dim)
      ik = self.index_k_proj(hi).reshape(b, t, 1, c.index_head_dim)
      iq = self._rope(self.index_q_norm(iq), positions)
      ik = self._rope(self.index_k_norm(ik), positions)[:, :, 0]
      index_cache = cache_lib.write(index_cache, ik, positions)
      out = msa_jax.msa_attention(
          q, k_all, v_all, iq, index_cache.astype(q.dtype), block_size=c.index_block_size,
          topk=c.index_topk_blocks, q_positions=positions, kv_lengths=kv_lengths,
          implementation=implementation, interpret=interpret)
    else:
      key_pos = jnp.arange(k_cache.shape[1], dtype=jnp.int32)
      mask = ((key_pos[None, None, :] <= positions[:, :, None])
              & (key_pos[None, None, :] < kv_lengths[:, None, None]))
      out = jax.nn.dot_product_attention(q, k_all, v_all, mask=mask[:, None])
    out = self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim))
    return out, k_cache, v_cache, index_cache
