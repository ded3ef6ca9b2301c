"""Attention of the MiniMax-M3 family (docs/minimax_m3.md §3.4, §3.6).

Full-attention layers and the main branch of MSA layers share one structure:
``q/k/v`` projections, per-head Gemma RMSNorm on q and k, partial NeoX RoPE, GQA with query
head h in group h // (Hq/G), scale 1/sqrt(D), output projection. MSA layers add the index
branch: ``index_q_proj`` (one head per group), ``index_k_proj`` (one shared head), per-head
index norms and the same RoPE, on a stop-gradient input (the index branch never sends
gradient into the backbone; it trains through ``msa_jax.indexer_kl_loss``). Selection and
sparse attention go through ``msa_jax.msa_attention``. Full-attention layers use
``msa_jax.full_attention`` with the same visibility rule (j <= p and j < kv_len): flash
attention that never builds the ``[T, S]`` scores (cuDNN for prefill and a split-K kernel for
decode on GPUs, an online softmax over key chunks elsewhere).

``train_forward`` is the cache-free full-sequence path of training and evaluation: attention
dense or MSA per call, and the per-layer indexer KL loss (selected or whole-causal support).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

import msa_jax
from models import cache as cache_lib
from models import losses
from models import sharding as sharding_lib
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

  def project(self, h, positions):
    """Main branch: q [B,T,Hq,D], k and v [B,T,G,D] (per-head norm and RoPE applied)."""
    c = self.config
    b, t, _ = h.shape
    q = self.q_proj(h).reshape(b, t, c.num_heads, c.head_dim)
    k = self.k_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = self.v_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)
    return self._rope(self.q_norm(q), positions), self._rope(self.k_norm(k), positions), v

  def project_index(self, h, positions):
    """Index branch on stop_gradient(h) (docs/msa.md §3.1, paper Eq. 11): q_idx [B,T,G,Di] and
    k_idx [B,T,Di]. Only the index projections and norms see gradient here (from the KL)."""
    c = self.config
    b, t, _ = h.shape
    hi = jax.lax.stop_gradient(h)
    iq = self.index_q_proj(hi).reshape(b, t, c.num_kv_heads, c.index_head_dim)
    ik = self.index_k_proj(hi).reshape(b, t, 1, c.index_head_dim)
    iq = self._rope(self.index_q_norm(iq), positions)
    ik = self._rope(self.index_k_norm(ik), positions)[:, :, 0]
    return iq, ik

  def __call__(self, h, positions, kv_lengths, k_cache, v_cache, index_cache, *,
               implementation="xla", interpret=False):
    """h [B,T,H]; positions [B,T] (-1 = padding); caches hold kv_lengths valid tokens after
    this step's write. Returns (out [B,T,H], k_cache, v_cache, index_cache)."""
    c = self.config
    b, t, _ = h.shape
    q, k, v = self.project(h, positions)
    k_cache = cache_lib.write(k_cache, k, positions)
    v_cache = cache_lib.write(v_cache, v, positions)
    iq = None
    if self.sparse:
      iq, ik = self.project_index(h, positions)
      index_cache = cache_lib.write(index_cache, ik, positions)
    out = self._attend(q, k_cache, v_cache, iq, index_cache, positions, kv_lengths,
                       implementation=implementation, interpret=interpret)
    out = self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim))
    return out, k_cache, v_cache, index_cache

  def _attend(self, q, k, v, iq, index_keys, positions, kv_lengths, *, implementation,
              interpret, page_table=None):
    """Attention of q [B,T,Hq,D] over caches holding kv_lengths tokens: contiguous, or pages
    listed by ``page_table`` (msa_jax reads pages in place for decode and gathers them for
    longer chunks); per device on a mesh (``_on_devices``)."""
    attend = functools.partial(self._attend_local, implementation=implementation,
                               interpret=interpret)
    return self._on_devices(attend, ("q",), q=q, k=k, v=v, iq=iq, index_keys=index_keys,
                            positions=positions, kv_lengths=kv_lengths,
                            page_table=page_table)

  def _on_devices(self, fn, outs, **args):
    """``fn(**args)`` (arrays, or None) per device of the active mesh (inside
    ``sharding.activation_sharding``), in a ``shard_map``: the KV groups (and their query
    and index heads) split over ``tensor``, the rows over the batch axes (not with a paged
    cache, whose pages are shared by the rows), so each device runs the kernels on its own
    heads (XLA cannot partition a Pallas call, and would gather its inputs to one device).
    ``outs`` names each output's layout like an argument's ("q", "ids"); "mean": a scalar
    averaged over the devices (equal shares of the queries). Without a mesh: ``fn(**args)``."""
    mesh = sharding_lib.active_mesh()
    if mesh is None or mesh.size == 1:
      return fn(**args)
    P = jax.sharding.PartitionSpec
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and self.config.num_kv_heads % tensor == 0 else None
    rows = (None if args.get("page_table") is not None else
            sharding_lib.fitted_spec(args["q"].shape[:1], ("batch",), mesh)[0])
    per_head = P(rows, None, heads, None)
    specs = dict(q=per_head, k=per_head, v=per_head, iq=per_head, ids=per_head,
                 index_keys=P(rows, None, None), positions=P(rows, None), kv_lengths=P(rows),
                 page_table=P(rows, None), mean=P())
    split = tuple(a for a in ((rows,) if isinstance(rows, str) else tuple(rows or ()))
                  + ((heads,) if heads else ()))
    given = {name: x for name, x in args.items() if x is not None}

    def local(given):
      out = fn(**{**args, **given})
      single = len(outs) == 1
      out = (out,) if single else out
      out = tuple(jax.lax.pmean(x, split) if name == "mean" and split else x
                  for name, x in zip(outs, out))
      return out[0] if single else out

    out_specs = specs[outs[0]] if len(outs) == 1 else tuple(specs[name] for name in outs)
    return jax.shard_map(local, mesh=mesh, in_specs=({n: specs[n] for n in given},),
                         out_specs=out_specs, check_vma=False)(given)

  def _attend_local(self, q, k, v, iq, index_keys, positions, kv_lengths, page_table, *,
                    implementation, interpret):
    c = self.config
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if self.sparse:
      return msa_jax.msa_attention(
          q, k, v, iq, index_keys.astype(q.dtype), block_size=c.index_block_size,
          topk=c.index_topk_blocks, q_positions=positions, kv_lengths=kv_lengths,
          page_table=page_table, implementation=implementation, interpret=interpret,
          score_dtype=c.index_score_dtype)
    return msa_jax.full_attention(q, k, v, q_positions=positions, kv_lengths=kv_lengths,
                                  page_table=page_table, implementation=implementation,
                                  interpret=interpret)

  def paged(self, h, positions, kv_lengths, k_pages, v_pages, index_pages, page_table, *,
            implementation="xla", interpret=False):
    """As ``__call__`` on paged caches (``cache_lib.PagedModelCache``'s per-layer pages and shared
    page table). Decode steps (at most ``msa_jax.MAX_DECODE_QUERIES`` new tokens per
    sequence) read the pages in place: MSA layers only the selected ones, full-attention
    layers all of the sequence's; longer chunks (prefill) gather the sequence's pages into
    contiguous keys first. Returns (out [B,T,H], k_pages, v_pages, index_pages)."""
    c = self.config
    b, t, _ = h.shape
    q, k, v = self.project(h, positions)
    iq = ik = None
    if self.sparse:
      iq, ik = self.project_index(h, positions)
    layer = msa_jax.paged.PagedCache(k_pages, v_pages, index_pages, page_table, kv_lengths)
    layer = msa_jax.paged.write(layer, k, v, ik, positions)
    k_pages, v_pages, index_pages = layer.k_pages, layer.v_pages, layer.index_pages
    out = self._attend(q, k_pages, v_pages, iq, index_pages, positions, kv_lengths,
                       implementation=implementation, interpret=interpret,
                       page_table=page_table)
    out = self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim))
    return out, k_pages, v_pages, index_pages

  def train_forward(self, h, *, attention="msa", indexer_loss=None, capture=False,
                    implementation="xla", interpret=False, dense_implementation=None):
    """Full-sequence forward from an empty context, no cache (training and evaluation).

    Args:
      h: [B, T, H] normed layer input; query t sits at position t.
      attention: "msa" (an MSA layer selects blocks and attends to them) or "dense" (dense
        causal attention in every layer: the warm-up and dense-training mode).
      indexer_loss: None (no KL), "selected" (KL over the visible tokens of the index
        branch's own top-k blocks, docs/msa.md §5; in dense mode the selection comes from
        ``msa_jax.index_topk`` while attention stays dense), "causal" (KL over the whole
        causal context: the warm-up stage 1 of the MSA paper, arXiv 2606.13392) or
        "causal_block" (the same context, KL over block masses against max-pooled index
        scores: ``models.losses`` ``pool="block"``, an extension beyond the paper).
      capture: also return q, k, q_idx, k_idx and the selection (evaluation metrics).
      dense_implementation: ``implementation=`` of ``jax.nn.dot_product_attention``
        (None = XLA; "cudnn" for flash attention on GPU with bf16).

    Returns:
      (out [B, T, H], aux) with ``aux["kl"]`` a float32 scalar (0 for a full-attention layer
      or without ``indexer_loss``) and, with ``capture``, the tensors above (None where a
      full-attention layer has none).
    """
    c = self.config
    b, t, _ = h.shape
    if attention not in ("msa", "dense"):
      raise ValueError(f"attention must be 'msa' or 'dense'; got {attention!r}")
    if indexer_loss not in (None, "selected", "causal", "causal_block"):
      raise ValueError(f"indexer_loss must be None, 'selected', 'causal' or 'causal_block'; "
                       f"got {indexer_loss!r}")
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kv_lengths = jnp.full((b,), t, jnp.int32)
    q, k, v = self.project(h, positions)
    kl = jnp.zeros((), jnp.float32)
    iq = ik = ids = None
    index_kw = dict(block_size=c.index_block_size, q_positions=positions,
                    kv_lengths=kv_lengths)
    select_kw = dict(index_kw, score_dtype=c.index_score_dtype)  # the selection only
    if self.sparse and (attention == "msa" or indexer_loss is not None or capture):
      iq, ik = self.project_index(h, positions)
    if self.sparse and attention == "msa":
      attend = lambda q, k, v, iq, index_keys, positions, kv_lengths: msa_jax.msa_attention(
          q, k, v, iq, index_keys.astype(q.dtype), topk=c.index_topk_blocks,
          return_indices=True, implementation=implementation, interpret=interpret,
          block_size=c.index_block_size, q_positions=positions, kv_lengths=kv_lengths,
          score_dtype=c.index_score_dtype)
      out, ids = self._on_devices(attend, ("q", "ids"), q=q, k=k, v=v, iq=iq, index_keys=ik,
                                  positions=positions, kv_lengths=kv_lengths)
    else:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                         implementation=dense_implementation)
      if iq is not None and (indexer_loss == "selected" or capture):
        ids = msa_jax.index_topk(jax.lax.stop_gradient(iq), jax.lax.stop_gradient(ik),
                                 topk=c.index_topk_blocks, implementation=implementation,
                                 interpret=interpret, **select_kw)
    if self.sparse and indexer_loss == "selected":
      loss = lambda q, k, iq, index_keys, ids, positions, kv_lengths: msa_jax.indexer_kl_loss(
          q, k, iq, index_keys, ids, implementation=implementation, interpret=interpret,
          block_size=c.index_block_size, q_positions=positions, kv_lengths=kv_lengths)
      kl = self._on_devices(loss, ("mean",), q=q, k=k, iq=iq, index_keys=ik, ids=ids,
                            positions=positions, kv_lengths=kv_lengths)
    elif self.sparse and indexer_loss in ("causal", "causal_block"):
      # The MSA paper's warm-up (arXiv 2606.13392): KL against the full causal
      # main-branch distribution, not only the selected blocks, while attention is dense
      # ("causal_block": over block masses with max-pooled index scores, an extension).
      kl = losses.causal_indexer_kl_loss(
          q, k, iq, ik, q_positions=positions, block_size=c.index_block_size,
          pool="block" if indexer_loss == "causal_block" else "token")
    out = self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim))
    aux = {"kl": kl.astype(jnp.float32)}
    if capture:
      aux.update(q=q, k=k, q_idx=iq, k_idx=ik, block_indices=ids)
    return out, aux
