"""``index_topk``'s paths, one per (implementation, query count) row of ``msa_jax.dispatch``.

Each takes the index queries ``q_idx [B, T, G, Di]``, a ``KV`` source with ``k_idx``
(contiguous ``[B, S, Di]`` or pages ``[P, Bk, Di]``), the query positions and returns the
int32 ``[B, T, G, topk]`` selection. ``score_dtype`` "float8_e4m3fn" scores from the
FP8-rounded values (queries per token, keys per block; ``reference.fp8_round``); on Hopper
the Mosaic kernel runs the GEMM in FP8 instead.
"""

from __future__ import annotations

from msa_jax import reference
from msa_jax import tuning

# Query chunk for index scoring: bounds the [B, G, chunk, S/Bk] block-score buffer.
QUERY_CHUNK = 2048


def fp8_rounded(x):
  """Index queries as FP8 scoring sees them (``reference.fp8_round``), in x's dtype: an E4M3
  value times a power of two is exact in float32 and bfloat16."""
  return reference.fp8_round(x).astype(x.dtype)


def _scored_inputs(q_idx, k_idx, block_size, score_dtype):
  """(q_idx, k_idx) rounded as ``score_dtype`` scores them; contiguous keys and pages alike
  are rounded per block (a page is a block)."""
  if score_dtype is None:
    return q_idx, k_idx
  return fp8_rounded(q_idx), reference.fp8_round_blocks(k_idx, block_size).astype(k_idx.dtype)


def xla(q_idx, source, q_positions, *, block_size, topk, score_dtype, interpret):
  del interpret
  q_idx, k_idx = _scored_inputs(q_idx, source.k_idx, block_size, score_dtype)
  source = source._replace(k_idx=k_idx).contiguous()  # pages rounded as the kernels round them
  return reference.index_topk(q_idx, source.k_idx, q_positions, source.lengths,
                              block_size=block_size, topk=topk)


def _mosaic(q_idx, k_idx, q_positions, kv_lengths, *, block_size, topk, interpret,
            score_dtype, decode):
  """The Mosaic GPU index kernel (Hopper), or None where it does not apply to these inputs.

  Decode (few rows) splits the keys into ranges over enough CTAs to reach the table's
  ``min_programs``. FP8: q's per-token scale never changes a row's order (dropped); each
  block's scale multiplies its block max."""
  from msa_jax.ops.index_topk import gpu_mosaic as kernel
  fp8 = score_dtype is not None
  if not (kernel.supports_fp8(q_idx, block_size, topk) if fp8 else
          kernel.supports(q_idx, k_idx, block_size, topk)):
    return None
  splits = 1
  if decode:
    b, t, g, _ = q_idx.shape
    ctas = b * reference.cdiv(t * g, kernel.CTA_ROWS)
    shape = tuning.shape(k_idx.shape[1], t)
    splits = reference.cdiv(tuning.config("index_decode", shape=shape).min_programs or 1, ctas)
    if interpret:  # enough ranges to exercise the merge, few enough to simulate
      splits = min(splits, 4)
  scale = None
  if fp8:
    q_idx, _ = reference.fp8_per_token(q_idx)
    k_idx, scale = reference.fp8_per_block(k_idx, block_size)
  return kernel.fused_topk(q_idx, k_idx, q_positions, kv_lengths, block_size=block_size,
                           topk=topk, k_block_scale=scale, splits=splits, interpret=interpret)


def _gpu(q_idx, source, q_positions, *, block_size, topk, score_dtype, interpret, decode):
  """The table's ``selection`` for contiguous keys: "mosaic" (Hopper; falls back to the
  Triton kernels where it does not apply), "fused" (prefill: top-k inside the scoring
  kernel), "tile" (each key tile's candidates, then a merge) or "scores" (block scores,
  then ``reference.select_blocks``)."""
  from msa_jax.ops.index_topk import gpu_triton as kernel
  section = "index_decode" if decode else "index"
  k_idx, kv_lengths = source.k_idx, source.lengths
  selection = tuning.config(section, shape=tuning.shape(k_idx.shape[1], q_idx.shape[1])).selection
  if selection == "mosaic":
    ids = _mosaic(q_idx, k_idx, q_positions, kv_lengths, block_size=block_size, topk=topk,
                  interpret=interpret, score_dtype=score_dtype, decode=decode)
    if ids is not None:
      return ids
    selection = "tile" if decode else "fused"
  q_idx, k_idx = _scored_inputs(q_idx, k_idx, block_size, score_dtype)
  if selection == "fused":  # nothing per query but the ids is kept: no chunking needed
    return kernel.fused_topk(q_idx, k_idx, q_positions, kv_lengths, block_size=block_size,
                             topk=topk, interpret=interpret)

  def chunk(pos, qi):
    if selection == "tile":
      # Each key tile's top blocks come out of the scoring kernel; block scores never do.
      values, ids = kernel.tile_candidates(qi, k_idx, pos, kv_lengths, block_size=block_size,
                                           topk=topk, interpret=interpret)
      if decode:  # few rows: one small merge kernel
        return kernel.merge_candidates(values, ids, topk, interpret=interpret)
      return reference.top_candidates(values, ids, topk)
    scores = kernel.block_scores(qi, k_idx, pos, kv_lengths, block_size=block_size,
                                 interpret=interpret)
    return reference.select_blocks(scores, reference.own_block(pos, kv_lengths, block_size),
                                   topk)

  return reference.map_query_chunks(chunk, QUERY_CHUNK, q_positions, q_idx)


def gpu_prefill(q_idx, source, q_positions, **kw):
  """Contiguous keys (a paged source is gathered first)."""
  return _gpu(q_idx, source.contiguous(), q_positions, decode=False, **kw)


def gpu_decode(q_idx, source, q_positions, *, block_size, topk, score_dtype, interpret):
  """Few queries: the paged kernel over pages, the decode kernels over contiguous keys."""
  if not source.paged:
    return _gpu(q_idx, source, q_positions, block_size=block_size, topk=topk,
                score_dtype=score_dtype, interpret=interpret, decode=True)
  from msa_jax.ops.index_topk import gpu_triton_paged as kernel
  q_idx, pages = _scored_inputs(q_idx, source.k_idx, block_size, score_dtype)
  return kernel.paged_index_topk(q_idx, pages, source.page_table, q_positions, source.lengths,
                                 block_size=block_size, topk=topk, interpret=interpret)


def tpu(q_idx, source, q_positions, *, block_size, topk, score_dtype, interpret):
  """Block scores from the TPU kernel (over pages for a paged source), then the top-k."""
  q_idx, k_idx = _scored_inputs(q_idx, source.k_idx, block_size, score_dtype)
  lengths = source.lengths
  own = lambda pos: reference.own_block(pos, lengths, block_size)
  if source.paged:
    from msa_jax.ops.index_topk import tpu_paged as kernel
    scores = kernel.paged_block_scores(q_idx, k_idx, source.page_table, q_positions, lengths,
                                       block_size=block_size, interpret=interpret)
    return reference.select_blocks(scores, own(q_positions), topk)
  from msa_jax.ops.index_topk import tpu as kernel

  def chunk(pos, qi):
    scores = kernel.block_scores(qi, k_idx, pos, lengths, block_size=block_size,
                                 interpret=interpret)
    return reference.select_blocks(scores, own(pos), topk)

  return reference.map_query_chunks(chunk, QUERY_CHUNK, q_positions, q_idx)
