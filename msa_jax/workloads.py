"""Index-branch inputs whose selections look like a trained model's, and how to measure that.

With random ``q_idx``/``k_idx`` every query keeps its own block plus blocks spread uniformly
over its past, so neighbouring queries share almost nothing. Trained indexers select
differently: every query keeps a few *sink* blocks at the start of the sequence, the blocks
just before it (*recency*), and blocks whose content matches what the text around it is
about, shared by many neighbouring queries. A KV-outer kernel reads each selected block once
per tile of queries that share it, so how much neighbours share changes the kernels' cost.

``structured_index_inputs`` builds ``q_idx``/``k_idx`` whose scores add three terms and a
little noise:

* **sinks**: the keys of the first ``sinks`` blocks score ``sink_score`` for every query;
* **recency**: random Fourier features of the position in ``q`` and ``k``, so their dot
  product is about ``recency_score * exp(-d**2 / (2 * recency**2))`` at distance ``d``;
* **content**: queries come in segments of ``segment`` consecutive positions, each about one
  of ``topics`` topics (a random unit vector per topic); each topic owns ``hits`` random
  blocks of the sequence, whose keys carry its vector, so every query of a segment scores
  ``content_score`` on the blocks of its topic in its past.

``union_size`` reports the mean number of distinct blocks that runs of ``span`` consecutive
queries select: ``topk`` when neighbours agree completely, up to ``span * topk`` when they
share nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from msa_jax import reference


@dataclasses.dataclass(frozen=True)
class Workload:
  """The attention geometry a benchmark or sweep runs at (MiniMax-M3's by default)."""
  q_heads: int = 64
  groups: int = 4
  head_dim: int = 128
  index_dim: int = 128
  block_size: int = 128
  topk: int = 16
  dtype: str = "bfloat16"
  index_score_dtype: str | None = None  # msa_jax.index_topk's score_dtype


M3 = Workload()
SMOKE = Workload(q_heads=16, groups=1, head_dim=32, index_dim=16, block_size=16, topk=4,
                 dtype="float32")


def structured_index_inputs(key, batch: int, length: int, groups: int, dim: int, *,
                            block_size: int = 128, sinks: int = 1, recency: float = 1024.0,
                            segment: int = 256, topics: int = 64, hits: int = 8,
                            sink_score: float = 6.0, recency_score: float = 4.0,
                            content_score: float = 5.0, noise: float = 0.25,
                            features: int = 16, query_start: int = 0, dtype=jnp.bfloat16):
  """``q_idx [B, N - query_start, G, Di]`` (the queries at positions ``query_start ..
  length - 1``: all for a prefill, the last few for decode) and ``k_idx [B, N, Di]`` for a
  sequence of ``length`` tokens with the structure described in the module docstring.

  ``dim`` must hold the sink, the ``2 * features`` recency features and room for the topic
  vectors (at least 4 more; topics are nearly orthogonal only with a few dozen). Queries of
  one segment share a topic per (batch, group); topics are drawn per segment with
  replacement.
  """
  content_dim = dim - 1 - 2 * features
  if content_dim < 4:
    raise ValueError(f"dim {dim} leaves {content_dim} dimensions for the topics; need >= 4 "
                     f"(dim >= {2 * features + 5} with features={features})")
  if not 0 <= query_start < length:
    raise ValueError(f"query_start must lie in [0, {length}); got {query_start}")
  num_blocks = reference.cdiv(length, block_size)
  k_freq, k_topic, k_hits, k_seg, k_qn, k_kn = jax.random.split(key, 6)
  pos = jnp.arange(length, dtype=jnp.float32)

  # Recency: w ~ N(0, 1/recency^2) makes E[cos(w d)] = exp(-d^2 / (2 recency^2)).
  freqs = jax.random.normal(k_freq, (features,)) / recency
  phase = pos[:, None] * freqs[None, :]  # [N, F]
  fourier = jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1) / jnp.sqrt(features)

  # Content: a unit vector per topic; each topic's blocks carry it in their keys.
  vectors = jax.random.normal(k_topic, (topics, content_dim))
  vectors = vectors / jnp.linalg.norm(vectors, axis=-1, keepdims=True)
  owner = jax.random.randint(k_hits, (batch, topics, hits), 0, num_blocks)  # blocks per topic
  block_content = jnp.zeros((batch, num_blocks, content_dim)).at[
      jnp.arange(batch)[:, None, None], owner].add(
          jnp.broadcast_to(vectors[None, :, None], (batch, topics, hits, content_dim)))
  key_block = jnp.arange(length) // block_size
  k_content = block_content[:, key_block]  # [B, N, C]

  sink = (key_block < sinks).astype(jnp.float32)
  k_idx = jnp.concatenate([
      jnp.broadcast_to(sink[None, :, None] * sink_score, (batch, length, 1)),
      jnp.broadcast_to(fourier[None] * jnp.sqrt(recency_score), (batch, length, 2 * features)),
      k_content * jnp.sqrt(content_score)], axis=-1)

  num_segments = reference.cdiv(length, segment)
  topic = jax.random.randint(k_seg, (batch, num_segments, groups), 0, topics)
  q_pos = jnp.arange(query_start, length)
  q_topic = vectors[topic][:, q_pos // segment]  # [B, Tq, G, C]
  q_idx = jnp.concatenate([
      jnp.ones((batch, q_pos.size, groups, 1)),
      jnp.broadcast_to((fourier[query_start:] * jnp.sqrt(recency_score))[None, :, None],
                       (batch, q_pos.size, groups, 2 * features)),
      q_topic * jnp.sqrt(content_score)], axis=-1)

  # Noise with score std ~ noise: each side contributes independent terms.
  q_idx = q_idx + jax.random.normal(k_qn, q_idx.shape) * jnp.sqrt(noise / dim)
  k_idx = k_idx + jax.random.normal(k_kn, k_idx.shape) * jnp.sqrt(noise)
  return q_idx.astype(dtype), k_idx.astype(dtype)


def union_size(block_indices, num_blocks: int, span: int = 8) -> jax.Array:
  """Mean over (batch, group, run of ``span`` consecutive queries) of the number of distinct
  valid blocks the run selects (``-1`` slots, out-of-range ids and repeats not counted).
  ``block_indices [B, T, G, k]``; a last partial run counts the queries it has."""
  b, t, g, k = block_indices.shape
  runs = reference.cdiv(t, span)
  ids = jnp.where(reference.valid_block_mask(block_indices, num_blocks), block_indices, -1)
  ids = jnp.pad(ids, ((0, 0), (0, runs * span - t), (0, 0), (0, 0)), constant_values=-1)
  ids = ids.reshape(b, runs, span, g, k).transpose(0, 1, 3, 2, 4).reshape(b, runs, g, span * k)
  ids = jnp.sort(ids, axis=-1)
  first = jnp.concatenate([jnp.ones_like(ids[..., :1], bool), ids[..., 1:] != ids[..., :-1]],
                          axis=-1)
  return jnp.mean(jnp.sum(first & (ids >= 0), axis=-1, dtype=jnp.float32))


def selection_recall(got, want) -> float:
  """The share of ``want``'s selected blocks that ``got`` also selects for the same (query,
  group): ``[..., k]`` block ids, -1 = none (e.g. an FP8 selection against the bf16 one)."""
  valid = want >= 0
  hit = jnp.any(want[..., :, None] == got[..., None, :], axis=-1) & valid
  return float(jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1))
