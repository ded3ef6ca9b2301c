"""Public API of msa_jax: the MSA ops over contiguous or paged keys, dispatched by
``msa_jax.dispatch`` on (op, implementation, query count).

Every op reads its keys from one of two sources. Contiguous: ``k [B, S, G, D]`` (and ``v``,
``k_idx [B, S, Di]``) with ``kv_lengths [B]`` valid keys (default S). Paged: the same
arrays as pages ``[P, Bk, ...]`` of Bk = ``block_size`` tokens, ``page_table int32
[B, max_pages]`` listing each sequence's pages in token order (-1 = none) and ``kv_lengths``
(required) counting the tokens cached, the new ones included (``msa_jax.paged`` builds such
caches). Selections are logical block ids either way: block ``j`` of sequence ``b`` is its
page ``page_table[b, j]``. Few queries per sequence (at most ``MAX_DECODE_QUERIES``) read
pages in place; longer query ranges gather them first. Gradients flow over contiguous K/V.

Every function validates its arguments first (``checks.py``: shapes, dtypes and static
arguments before anything is traced, ``ValueError`` naming the argument; block ids, page ids
and lengths range-checked when concrete, out-of-range ids ignored like -1 under ``jit``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from msa_jax import checks
from msa_jax import dispatch
from msa_jax import reference
from msa_jax.source import KV

IMPLEMENTATIONS = checks.IMPLEMENTATIONS


def _keys(name, keys, q_positions, kv_lengths, page_table, batch, q_len, block_size):
  """(q_positions, kv_lengths, page_table) of a call, defaults filled: ``keys`` is the
  contiguous ``[B, S, ...]`` array or the pages ``[P, Bk, ...]`` named ``name``."""
  if page_table is None:
    q_positions, kv_lengths = checks.resolve_positions(q_positions, kv_lengths, batch, q_len,
                                                       keys.shape[1])
    return q_positions, kv_lengths, None
  if kv_lengths is None:
    raise ValueError(f"kv_lengths [batch] is required with page_table: the tokens cached per "
                     f"sequence in {name}, the new ones included")
  page_table, kv_lengths = checks.check_page_table(page_table, kv_lengths, batch, block_size,
                                                   keys.shape[0])
  return checks.resolve_q_positions(q_positions, kv_lengths, batch, q_len), kv_lengths, page_table


def _num_blocks(keys, page_table, block_size):
  return reference.cdiv(keys.shape[1], block_size) if page_table is None else page_table.shape[1]


# ----------------------------------------------------------------------------- index_topk


def index_topk(q_idx, k_idx, *, block_size=128, topk=16, q_positions=None, kv_lengths=None,
               page_table=None, implementation=None, interpret=False, score_dtype=None):
  """Select the top-k KV blocks per (query, group) from the index branch (docs/msa.md §3).

  Args:
    q_idx: [B, T, G, Di] index queries, one head per KV group.
    k_idx: [B, S, Di] index keys (one shared head), or pages [P, Bk, Di] with page_table.
    block_size: KV block size Bk in tokens.
    topk: blocks per (query, group), the query's own block included.
    q_positions: int [B, T] absolute query positions (default: bottom-right aligned).
    kv_lengths: int [B] valid key length per sequence (default: S; required when paged).
    page_table: int [B, max_pages] when k_idx holds pages (module docstring).
    implementation: None (best for the backend), "xla", "pallas_gpu" or "pallas_tpu".
    interpret: run a Pallas implementation in interpret mode (any backend).
    score_dtype: None (scores from q_idx/k_idx as given) or "float8_e4m3fn": q_idx rounded
      to E4M3 with one power-of-two scale per token, k_idx with one per KV block
      (``reference.fp8_round`` / ``fp8_round_blocks``), and scored from those values; on
      Hopper with the Mosaic index kernel the GEMM runs in FP8. Not the default: on long
      contexts its selection keeps 92-98% of the bf16 selection's blocks
      (``benchmarks/NOTES.md``).

  Returns:
    int32 [B, T, G, topk]: selected block ids, valid ids first, -1 padding. Order inside the
    valid prefix is unspecified.
  """
  block_size, topk = checks.check_static(block_size, topk)
  score_dtype = checks.check_score_dtype(score_dtype)
  impl = checks.resolve_implementation(implementation, interpret)
  if page_table is None:
    checks.check_index_qk(q_idx, k_idx)
  else:
    checks.check_paged_index(q_idx, k_idx, block_size)
  b, t = q_idx.shape[:2]
  q_positions, kv_lengths, page_table = _keys("k_idx", k_idx, q_positions, kv_lengths,
                                              page_table, b, t, block_size)
  if checks.is_empty(b, t):
    return jnp.full((b, t, q_idx.shape[2], topk), -1, jnp.int32)
  # Integer ids: no gradient, and none traced through the kernels (their JVP is undefined).
  q_idx, k_idx = jax.lax.stop_gradient((q_idx, k_idx))
  source = KV(k_idx=k_idx, page_table=page_table, lengths=kv_lengths)
  return dispatch.path("index_topk", impl, t)(q_idx, source, q_positions, block_size=block_size,
                                               topk=topk, score_dtype=score_dtype,
                                               interpret=interpret)


# ----------------------------------------------------------------------------- sparse attention


def _check_kv(q, k, v, page_table, block_size):
  if page_table is None:
    checks.check_qkv(q, k, v)
  else:
    checks.check_paged_kv(q, k, v, block_size)


def _empty(q, v, groups, topk):
  b, t, hq = q.shape[:3]
  return (jnp.zeros((b, t, hq, v.shape[3]), q.dtype), jnp.full((b, t, groups, topk), -1, jnp.int32),
          jnp.full((b, t, hq), -jnp.inf, jnp.float32))


def sparse_attention(q, k, v, block_indices, *, block_size=128, scale=None, q_positions=None,
                     kv_lengths=None, page_table=None, return_lse=False, implementation=None,
                     interpret=False):
  """Exact attention of each query over the visible keys of its selected blocks (docs/msa.md §4).

  Args:
    q: [B, T, Hq, D]; k: [B, S, G, D]; v: [B, S, G, Dv]; Hq a multiple of G. Query head h
      belongs to group h // (Hq/G). With page_table, k and v are pages [P, Bk, G, D(v)].
    block_indices: int [B, T, G, topk] selected block ids per (query, group); -1 = none.
      Repeated ids count once.
    block_size: KV block size in tokens.
    scale: logit scale (default 1/sqrt(D)).
    q_positions, kv_lengths, page_table: as in ``index_topk``.
    return_lse: also return the float32 log-sum-exp [B, T, Hq] (natural log).
    implementation, interpret: as in ``index_topk``.

  Returns:
    out [B, T, Hq, Dv] in q's dtype (and lse). Queries without a visible key (padding) get
    out = 0 and lse = -inf.
  """
  block_size, _ = checks.check_static(block_size)
  _check_kv(q, k, v, page_table, block_size)
  b, t, hq, d = q.shape
  q_positions, kv_lengths, page_table = _keys("k", k, q_positions, kv_lengths, page_table, b, t,
                                              block_size)
  checks.check_block_indices(block_indices, b, t, k.shape[2], _num_blocks(k, page_table,
                                                                          block_size))
  scale = checks.resolve_scale(scale, d)
  impl = checks.resolve_implementation(implementation, interpret)
  if checks.is_empty(b, t):
    out, _, lse = _empty(q, v, k.shape[2], 1)
  else:
    source = KV(k=k, v=v, page_table=page_table, lengths=kv_lengths)
    out, lse = dispatch.path("sparse_attention", impl, t)(
        q, source, jnp.asarray(block_indices, jnp.int32), q_positions, block_size=block_size,
        scale=scale, interpret=interpret)
  return (out, lse) if return_lse else out


def msa_attention(q, k, v, q_idx, k_idx, *, block_size=128, topk=16, scale=None,
                  q_positions=None, kv_lengths=None, page_table=None, return_indices=False,
                  return_lse=False, implementation=None, interpret=False, score_dtype=None):
  """MSA: index branch selects blocks (``index_topk``), main branch attends to them.

  Shapes as in ``index_topk`` and ``sparse_attention`` (k, v, k_idx contiguous, or pages
  with ``page_table``); ``q_idx`` has one head per KV group. ``score_dtype``: the index
  scores' precision, as in ``index_topk``.
  Returns out [B, T, Hq, Dv], then the int32 [B, T, G, topk] selection when
  ``return_indices`` and the float32 lse [B, T, Hq] when ``return_lse``. Gradients flow to q, k, v (selection is not differentiable; train the
  index branch with ``indexer_kl_loss``).
  """
  block_size, topk = checks.check_static(block_size, topk)
  _check_kv(q, k, v, page_table, block_size)
  b, t, _, d = q.shape
  g = k.shape[2]
  if page_table is None:
    checks.check_index_qk(q_idx, k_idx, b, t, k.shape[1], g)
  else:
    if k_idx is None:
      raise ValueError("k_idx must be an array [num_pages, page_size, index_dim]; got None (a "
                       "cache without an index branch cannot run MSA)")
    checks.check_paged_index(q_idx, k_idx, block_size, g, k.shape[0])
    if q_idx.shape[:2] != (b, t):
      raise ValueError(f"q_idx must have [batch, q_len] = [{b}, {t}] (as q); got shape "
                       f"{checks.shape_of(q_idx)}")
  score_dtype = checks.check_score_dtype(score_dtype)
  scale = checks.resolve_scale(scale, d)
  impl = checks.resolve_implementation(implementation, interpret)
  q_positions, kv_lengths, page_table = _keys("k", k, q_positions, kv_lengths, page_table, b, t,
                                              block_size)
  if checks.is_empty(b, t):
    out, ids, lse = _empty(q, v, g, topk)
  else:
    source = KV(k=k, v=v, k_idx=k_idx, page_table=page_table, lengths=kv_lengths)
    selecting = source._replace(k_idx=jax.lax.stop_gradient(k_idx))  # no gradient: ids
    ids = dispatch.path("index_topk", impl, t)(
        jax.lax.stop_gradient(q_idx), selecting, q_positions, block_size=block_size,
        topk=topk, score_dtype=score_dtype, interpret=interpret)
    out, lse = dispatch.path("sparse_attention", impl, t)(
        q, source, ids, q_positions, block_size=block_size, scale=scale, interpret=interpret)
  result = (out,) + ((ids,) if return_indices else ()) + ((lse,) if return_lse else ())
  return result[0] if len(result) == 1 else result


def indexer_kl_loss(q, k, q_idx, k_idx, block_indices, *, block_size=128, scale=None,
                    q_positions=None, kv_lengths=None, implementation=None, interpret=False):
  """KL alignment loss of the index branch (docs/msa.md §5), a float32 scalar.

  ``1/(N*G) * sum_{t,g} KL(P_teacher || P_idx)`` over the visible tokens of the selected blocks,
  N = number of non-padding queries. The teacher is the mean over the group's heads of each
  head's softmax of ``scale * q.k`` renormalised on that support, with q and k detached; the
  student is the softmax of ``q_idx.k_idx / sqrt(Di)``. Gradients reach q_idx and k_idx only.

  The value comes from the gather-based reference in query chunks. With a Pallas
  ``implementation`` the gradient runs through the sparse attention kernels
  (``ops/indexer_kl_loss/paths.py``). Contiguous K only.
  """
  checks.check_qkv(q, k, k)
  b, t, _, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  checks.check_index_qk(q_idx, k_idx, b, t, s_len, g)
  block_size, _ = checks.check_static(block_size)
  checks.check_block_indices(block_indices, b, t, g, reference.cdiv(s_len, block_size))
  scale = checks.resolve_scale(scale, d)
  impl = checks.resolve_implementation(implementation, interpret)
  q_positions, kv_lengths = checks.resolve_positions(q_positions, kv_lengths, b, t, s_len)
  if checks.is_empty(b, t):  # no query: no KL term (0, with zero gradients)
    return 0.0 * (jnp.sum(q_idx, dtype=jnp.float32) + jnp.sum(k_idx, dtype=jnp.float32))
  return dispatch.path("indexer_kl_loss", impl, t)(
      q, k, q_idx, k_idx, jnp.asarray(block_indices, jnp.int32), q_positions, kv_lengths,
      block_size=block_size, scale=scale, interpret=interpret)


__all__: Sequence[str] = ("index_topk", "sparse_attention", "msa_attention", "indexer_kl_loss",
                          "IMPLEMENTATIONS")
