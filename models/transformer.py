"""Decoder layer and model of the MiniMax-M3 family (docs/minimax_m3.md §3.3).

``x0 = embed_tokens[ids]`` (no scaling); per layer a pre-norm residual block
``x += Attn(rms(x)); x += FFN(rms(x))`` with full attention or MSA and a dense MLP or MoE as
the config lists; a final Gemma RMSNorm and an untied ``lm_head``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import cache as cache_lib
from models import sharding
from models.attention import Attention
from models.layers import Linear, RMSNorm
from models.moe import MLP, MoE


class DecoderLayer(nnx.Module):

  def __init__(self, config, layer: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    c = config
    self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, axis_name="embed_norm")
    self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps,
                                            axis_name="embed_norm")
    self.self_attn = Attention(c, sparse=c.sparse_layers[layer], rngs=rngs,
                               param_dtype=param_dtype)
    if c.moe_layers[layer]:
      self.block_sparse_moe = MoE(c, rngs=rngs, param_dtype=param_dtype)
      self.mlp = None
    else:
      self.mlp = MLP(c, c.dense_intermediate_size, rngs=rngs, param_dtype=param_dtype)
      self.block_sparse_moe = None

  def _block(self, x, attend, **moe_kw):
    """``x += attend(rms(x))`` (attend returns (out, state)), then the FFN: (x, state)."""
    attn, state = attend(self.input_layernorm(x))
    x = sharding.constrain(x + attn, ("batch", "seq", "embed_act"))
    h = self.post_attention_layernorm(x)
    ffn = self.mlp(h) if self.mlp is not None else self.block_sparse_moe(h, **moe_kw)
    return sharding.constrain(x + ffn, ("batch", "seq", "embed_act")), state

  def __call__(self, x, positions, kv_lengths, k_cache, v_cache, index_cache, *,
               implementation, interpret=False):
    def attend(h):
      out, *caches = self.self_attn(h, positions, kv_lengths, k_cache, v_cache, index_cache,
                                    implementation=implementation, interpret=interpret)
      return out, caches

    x, (k_cache, v_cache, index_cache) = self._block(
        x, attend, implementation=implementation, interpret=interpret)
    return x, k_cache, v_cache, index_cache

  def paged(self, x, positions, kv_lengths, k_pages, v_pages, index_pages, page_table, *,
            implementation, interpret=False):
    """As ``__call__`` on paged caches (``Attention.paged``)."""
    def attend(h):
      out, *pages = self.self_attn.paged(h, positions, kv_lengths, k_pages, v_pages,
                                         index_pages, page_table,
                                         implementation=implementation, interpret=interpret)
      return out, pages

    x, (k_pages, v_pages, index_pages) = self._block(
        x, attend, implementation=implementation, interpret=interpret)
    return x, k_pages, v_pages, index_pages

  def train_forward(self, x, **attention_kw):
    """Cache-free full-sequence layer (``Attention.train_forward``): (x, aux)."""
    return self._block(x, lambda h: self.self_attn.train_forward(h, **attention_kw))


class MiniMaxM3(nnx.Module):
  """The text model. ``dtype`` is the activation dtype; parameters are kept in
  ``param_dtype`` (router weights always float32)."""

  def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               implementation: str | None = "xla", interpret=False):
    c = config
    self.config = c
    self.dtype = dtype
    # How MSA layers run (msa_jax's implementation=/interpret=); no other model change needed.
    self.implementation = implementation
    self.interpret = interpret
    self.embed_tokens = nnx.Param(
        (jax.random.normal(rngs.params(), (c.vocab_size, c.hidden_size)) * 0.02).astype(
            param_dtype), logical_axes=("vocab", "embed"))
    self.layers = nnx.List([DecoderLayer(c, i, rngs=rngs, param_dtype=param_dtype)
                            for i in range(c.num_layers)])
    self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, axis_name="embed_norm")
    self.lm_head = Linear(c.hidden_size, c.vocab_size, axes=("embed", "vocab"), rngs=rngs,
                          param_dtype=param_dtype)

  def __call__(self, tokens: jax.Array, cache: cache_lib.Cache | cache_lib.PagedModelCache,
               num_new: jax.Array | None = None, *, last_only: bool = False):
    """Run ``tokens [B, T]`` after what ``cache`` holds (prefill, a chunk or decode steps).

    ``cache`` is contiguous (``cache_lib.Cache``) or paged (``cache_lib.PagedModelCache``, whose
    page table must already hold pages for the new tokens). ``num_new [B]`` (optional) says
    how many of the T tokens are real per sequence (ragged batches; the rest are padding and
    leave the cache untouched; 0 leaves a row alone). Returns
    ``(logits [B, T, V] float32, updated cache)``; with ``last_only`` the logits of each
    row's last real token only, ``[B, V]`` (what generation needs: a long prompt's
    ``[T, V]`` logits would not fit in memory).
    """
    positions = cache_lib.new_positions(cache.lengths, tokens.shape[1], num_new)
    added = tokens.shape[1] if num_new is None else num_new
    kv_lengths = (cache.lengths + added).astype(jnp.int32)
    x = self.embed_tokens[...][tokens].astype(self.dtype)
    x = sharding.constrain(x, ("batch", "seq", "embed_act"))
    paged = isinstance(cache, cache_lib.PagedModelCache)
    kw = dict(implementation=self.implementation, interpret=self.interpret)
    ks, vs, iks = [], [], []
    for layer, k_c, v_c, i_c in zip(self.layers, cache.k, cache.v, cache.index_k):
      if paged:
        x, k_c, v_c, i_c = layer.paged(x, positions, kv_lengths, k_c, v_c, i_c,
                                       cache.page_table, **kw)
      else:
        x, k_c, v_c, i_c = layer(x, positions, kv_lengths, k_c, v_c, i_c, **kw)
      ks.append(k_c)
      vs.append(v_c)
      iks.append(i_c)
    if last_only:
      last = (jnp.full((x.shape[0],), tokens.shape[1] - 1, jnp.int32) if num_new is None
              else jnp.maximum(num_new - 1, 0))
      x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    logits = self.lm_head(self.norm(x)).astype(jnp.float32)
    if paged:
      return logits, cache._replace(k=tuple(ks), v=tuple(vs), index_k=tuple(iks),
                                    lengths=kv_lengths)
    return logits, cache_lib.Cache(tuple(ks), tuple(vs), tuple(iks), kv_lengths)

  def forward(self, tokens: jax.Array) -> jax.Array:
    """Full-sequence forward of ``tokens [B, T]`` from an empty context: logits [B, T, V]."""
    cache = cache_lib.init_cache(self.config, tokens.shape[0], tokens.shape[1], self.dtype)
    return self(tokens, cache)[0]

  def train_forward(self, tokens: jax.Array, *, attention: str = "msa",
                    indexer_loss: str | None = None, capture: bool = False,
                    remat: bool = False, dense_implementation: str | None = None):
    """Training/evaluation forward of ``tokens [B, T]`` from position 0, without a cache.

    ``attention`` ("msa" or "dense") and ``indexer_loss`` (None, "selected", "causal", "causal_block") are as
    in ``Attention.train_forward``; ``remat`` recomputes each layer in the backward pass
    (activation memory of one layer instead of all). Returns ``(logits [B, T, V] float32,
    aux)`` with ``aux["kl"]`` float32 [num_layers] (0 for full-attention layers) and, with
    ``capture``, ``aux["layers"]``: per layer a dict of q, k, q_idx, k_idx, block_indices.
    """
    kw = dict(attention=attention, indexer_loss=indexer_loss, capture=capture,
              implementation=self.implementation, interpret=self.interpret,
              dense_implementation=dense_implementation)
    x = self.embed_tokens[...][tokens].astype(self.dtype)
    x = sharding.constrain(x, ("batch", "seq", "embed_act"))
    run = lambda layer, x: layer.train_forward(x, **kw)
    if remat:
      run = nnx.remat(run)
    auxes = []
    for layer in self.layers:
      x, aux = run(layer, x)
      auxes.append(aux)
    logits = self.lm_head(self.norm(x)).astype(jnp.float32)
    out = {"kl": jnp.stack([a["kl"] for a in auxes])}
    if capture:
      out["layers"] = [{k: v for k, v in a.items() if k != "kl"} for a in auxes]
    return logits, out


def create_model(config, *, seed: int = 0, **kwargs) -> MiniMaxM3:
  """``MiniMaxM3(config, rngs=nnx.Rngs(seed), **kwargs)`` with its parameters drawn in one
  compiled program (``nnx.jit``) instead of one small program per parameter: with JAX's
  persistent compilation cache (the commands enable it), a rerun skips the compilation (tiny
  preset on a CPU: 1.1 s instead of 4 s). The draws match the eager constructor's to a unit in
  the last place (XLA fuses the scaling differently)."""
  return nnx.jit(lambda: MiniMaxM3(config, rngs=nnx.Rngs(seed), **kwargs))()
