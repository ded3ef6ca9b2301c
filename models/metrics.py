"""Evaluation metrics: retrieval accuracy, perplexity and the indexer's recall (paper §5.2).

Indexer recall compares the index branch's selection Î with the main branch's own top-k blocks
I* (docs/msa.md §5, the MSA paper, arXiv 2606.13392), per query and GQA group:

* ``P_b``: the main branch's full causal attention probability summed over the tokens of block
  b, averaged over the group's heads (the KL teacher of docs/msa.md §5 at block granularity; the
  paper leaves per-head vs group-mean open, and selection is per group).
* ``I*``: the top-k blocks by ``P_b`` among the visible blocks, chosen by the same rule as the
  index selection (own block forced into one slot, ties to the lower block id, every visible
  block when there are at most k), so a perfect indexer scores 1.
* block recall ``|I* ∩ Î| / |I*|``;
* score recall ``Σ_{b ∈ I* ∩ Î} P_b / Σ_{b ∈ I*} P_b``.

Two diagnostics put the block recall in context:

* ``block_recall_maxpool``: the same recall against I*_max, the main branch's top-k blocks
  ranked the way MSA ranks the index scores: by the block's **largest** token probability
  (max-pool, docs/msa.md §3) instead of its summed mass. The paper's "top-k block set induced by
  the main-branch scores" does not say which pool; the summed mass is the headline.
* ``oracle_block_recall`` / ``oracle_score_recall``: the recall of I*_max itself against I*.
  I*_max is what an indexer whose token distribution equals the KL teacher exactly would select,
  so this is the block recall that perfect KL training reaches under MSA's max-pool selection:
  where it is below 1, the gap is the pool, not the indexer.

Rows are averaged over non-padding (query, group) pairs; the ``*_beyond_k`` variants average
only over queries with more than k visible blocks, where selection is not trivially all; the
``*_scored`` variants only over the queries whose next token is a scored target (the loss
mask: on the retrieval task, the queries that must find a stored pair).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from models import losses

MASS_QUERY_CHUNK = 256
RECALL_METRICS = ("block_recall", "score_recall", "block_recall_maxpool",
                  "oracle_block_recall", "oracle_score_recall")


def block_attention_mass(q, k, *, block_size: int, q_positions=None, scale=None,
                         chunk_size: int = MASS_QUERY_CHUNK, with_peak: bool = False):
  """Group-mean main-branch attention mass per KV block: float32 [B, T, G, ceil(S/Bk)].

  q [B, T, Hq, D], k [B, S, G, D]; full causal softmax over keys j <= p (q_positions default
  bottom-right aligned). A padding query (no visible key) gets all zeros. With ``with_peak``
  returns (mass, peak): ``peak`` is the block's largest group-mean token probability (0 for a
  block with no visible key).
  """
  b, t, hq, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  hpg = hq // g
  nb = -(-s_len // block_size)
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  if q_positions is None:
    q_positions = jnp.broadcast_to(s_len - t + jnp.arange(t, dtype=jnp.int32), (b, t))
  key_pos = jnp.arange(s_len, dtype=jnp.int32)
  size = min(chunk_size, t)
  n = -(-t // size)

  def chunk(args):
    pos, qc = args
    c = qc.shape[1]
    vis = key_pos[None, None, None, None, :] <= pos[:, :, None, None, None]
    s = jnp.einsum("bcghd,bsgd->bcghs", qc.reshape(b, c, g, hpg, d), k,
                   preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(vis, s, -jnp.inf), axis=-1)
    p = jnp.mean(jnp.where(vis, p, 0.0), axis=3)  # [B,c,G,S]
    p = jnp.pad(p, ((0, 0), (0, 0), (0, 0), (0, nb * block_size - s_len)))
    p = p.reshape(b, c, g, nb, block_size)
    return jnp.sum(p, axis=-1), (jnp.max(p, axis=-1) if with_peak else None)

  mass, peak = jax.lax.map(chunk, (losses.query_chunks(q_positions, n, size, -1),
                                   losses.query_chunks(q, n, size)))
  unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * size, g, nb)[:, :t]
  return (unchunk(mass), unchunk(peak)) if with_peak else unchunk(mass)


def visible_blocks(q_positions, num_blocks: int, block_size: int) -> jax.Array:
  """bool [B, T, num_blocks]: block b holds a key j <= p (b * Bk <= p)."""
  starts = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
  return starts[None, None, :] <= q_positions[:, :, None]


def main_topk_blocks(mass, q_positions, *, topk: int, block_size: int) -> jax.Array:
  """I*: bool [B, T, G, nb], the top-``topk`` visible blocks by ``mass`` [B, T, G, nb], own
  block (p // Bk) forced, ties to the lower block id."""
  nb = mass.shape[-1]
  vis = visible_blocks(q_positions, nb, block_size)[:, :, None, :]
  own = (q_positions // block_size)[:, :, None, None] == jnp.arange(nb)
  score = jnp.where(own & vis, jnp.inf, jnp.where(vis, mass, -jnp.inf))
  values, ids = jax.lax.top_k(score, min(topk, nb))  # lax.top_k: ties to the lower index
  chosen = jnp.any((ids[..., None] == jnp.arange(nb)) & (values[..., None] > -jnp.inf),
                   axis=-2)
  return chosen


def selection_mask(block_indices, num_blocks: int) -> jax.Array:
  """bool [B, T, G, nb] from int [B, T, G, k] block ids (-1 = none)."""
  return jnp.any(block_indices[..., None] == jnp.arange(num_blocks, dtype=jnp.int32), axis=-2)


def indexer_recall(mass, block_indices, q_positions, *, topk: int, block_size: int,
                   rank_by=None):
  """Per (query, group) block recall and score recall of the selection ``block_indices``
  [B, T, G, k] (or a bool [B, T, G, nb] selection mask) against the main branch's top-k blocks
  I* ranked by ``rank_by`` (default ``mass``; module docstring). Score recall always weighs
  blocks by ``mass``.

  Returns (block_recall [B, T, G], score_recall [B, T, G], valid bool [B, T, G],
  beyond_k bool [B, T, G]): recall is 0 where not valid (padding queries).
  """
  nb = mass.shape[-1]
  best = main_topk_blocks(mass if rank_by is None else rank_by, q_positions, topk=topk,
                          block_size=block_size)
  picked = (block_indices if block_indices.dtype == jnp.bool_
            else selection_mask(block_indices, nb))
  both = best & picked
  n_best = jnp.sum(best, axis=-1)
  valid = n_best > 0
  block = jnp.where(valid, jnp.sum(both, -1) / jnp.maximum(n_best, 1), 0.0)
  best_mass = jnp.sum(jnp.where(best, mass, 0.0), axis=-1)
  score = jnp.where(best_mass > 0, jnp.sum(jnp.where(both, mass, 0.0), -1)
                    / jnp.where(best_mass > 0, best_mass, 1.0), jnp.where(valid, 1.0, 0.0))
  n_visible = jnp.sum(visible_blocks(q_positions, nb, block_size), axis=-1)[:, :, None]
  beyond_k = valid & (n_visible > topk)
  return block, score, valid, jnp.broadcast_to(beyond_k, valid.shape)


def accuracy(logits, targets, mask):
  """(number of masked targets whose argmax is right, number of masked targets)."""
  right = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  return jnp.sum(right * mask), jnp.sum(mask)


def batch_metrics(model, inputs, targets, loss_mask, *, attention: str = "msa",
                  indexer: bool = True, dense_implementation=None) -> dict:
  """Summed metrics of one batch (add them up over batches, then ``finalize``).

  Keys: ``loss_sum``, ``tokens``, ``correct``; and per MSA layer i with ``indexer``:
  ``block_recall_sum/{i}``, ``score_recall_sum/{i}``, ``rows/{i}`` and the ``_beyond_k`` and
  ``_scored`` versions. The selection is the index branch's (as MSA would use it) whatever
  ``attention`` is.
  """
  logits, aux = model.train_forward(inputs, attention=attention, capture=indexer,
                                    dense_implementation=dense_implementation)
  loss_sum, tokens = losses.token_cross_entropy(logits, targets, loss_mask)
  correct, _ = accuracy(logits, targets, loss_mask)
  out = {"loss_sum": loss_sum, "tokens": tokens, "correct": correct}
  if not indexer:
    return out
  c = model.config
  b, t = inputs.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  recall = functools.partial(indexer_recall, q_positions=pos, topk=c.index_topk_blocks,
                             block_size=c.index_block_size)
  for i, layer in enumerate(aux["layers"]):
    if layer["block_indices"] is None:
      continue
    mass, peak = block_attention_mass(layer["q"], layer["k"], block_size=c.index_block_size,
                                      with_peak=True)
    block, score, valid, beyond = recall(mass, layer["block_indices"])
    values = {"block_recall": block, "score_recall": score,
              "block_recall_maxpool": recall(mass, layer["block_indices"], rank_by=peak)[0]}
    oracle = main_topk_blocks(peak, pos, topk=c.index_topk_blocks,
                              block_size=c.index_block_size)
    values["oracle_block_recall"], values["oracle_score_recall"] = recall(mass, oracle)[:2]
    scored = valid & (loss_mask[:, :, None] > 0)
    for name, rows in (("", valid), ("_beyond_k", beyond), ("_scored", scored)):
      for metric, value in values.items():
        out[f"{metric}{name}_sum/{i}"] = jnp.sum(jnp.where(rows, value, 0.0))
      out[f"rows{name}/{i}"] = jnp.sum(rows).astype(jnp.float32)
  return out


def finalize(sums: dict) -> dict:
  """Turn summed ``batch_metrics`` into loss, perplexity, accuracy and mean recalls (per
  layer under ``layers`` and averaged over layers)."""
  tokens = max(float(sums["tokens"]), 1.0)
  loss = float(sums["loss_sum"]) / tokens
  out = {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
         "accuracy": float(sums["correct"]) / tokens, "tokens": int(sums["tokens"])}
  layers = sorted({int(key.split("/")[1]) for key in sums if key.startswith("rows/")})
  if layers:
    per_layer = {}
    for i in layers:
      row = {}
      for name in ("", "_beyond_k", "_scored"):
        if f"rows{name}/{i}" not in sums:
          continue
        n = float(sums[f"rows{name}/{i}"])
        for metric in RECALL_METRICS:
          if f"{metric}{name}_sum/{i}" in sums:
            row[metric + name] = float(sums[f"{metric}{name}_sum/{i}"]) / n if n else None
      per_layer[str(i)] = row
    out["layers"] = per_layer
    for key in per_layer[str(layers[0])]:
      vals = [r[key] for r in per_layer.values() if r[key] is not None]
      out[key] = sum(vals) / len(vals) if vals else None
  return out


def evaluate(parts, params, source, *, num_examples: int, batch_size: int,
             attention: str = "msa", indexer: bool = True, mesh=None, rules=None,
             dense_implementation=None, progress: bool = False) -> dict:
  """Metrics of the model ``parts.merge(params)`` on the first ``num_examples`` examples of
  ``source``'s eval split (``finalize`` of the summed ``batch_metrics``).

  ``parts``: a ``models.training.ModelParts``; ``params`` its flat parameter dict (placed on
  ``mesh`` by the sharding rules; the batch goes over data x fsdp). ``num_examples`` is rounded
  up to whole batches.
  """
  from jax.sharding import NamedSharding
  from models import sharding as sharding_lib
  rules = rules or sharding_lib.RULES
  if mesh is None:
    mesh = sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  indexer = indexer and any(parts.config.sparse_layers)
  param_sh = parts.shardings(mesh, rules)
  batch_sh = NamedSharding(mesh, sharding_lib.spec(("batch", "seq"), mesh, rules))
  params = jax.device_put({k: jnp.asarray(v) for k, v in params.items()}, param_sh)

  # One compiled function per (parts, settings): repeated evaluations in a run reuse it.
  cache = parts.__dict__.setdefault("_eval_fns", {})
  key = (attention, indexer, dense_implementation, mesh, tuple(sorted(rules.items())))
  if key not in cache:
    cache[key] = jax.jit(lambda params, inputs, targets, mask: batch_metrics(
        parts.merge(params), inputs, targets, mask, attention=attention, indexer=indexer,
        dense_implementation=dense_implementation))
  run = cache[key]

  batches = range(-(-num_examples // batch_size))
  if progress:
    from tqdm import tqdm
    batches = tqdm(batches, desc=f"eval ({attention})", leave=False)
  sums = {}
  with sharding_lib.activation_sharding(mesh, rules):
    for i in batches:
      batch = source.batch(i * batch_size, batch_size, "eval")
      args = [jax.device_put(batch[k], batch_sh) for k in ("inputs", "targets", "loss_mask")]
      out = jax.device_get(run(params, *args))
      for key, value in out.items():
        sums[key] = sums.get(key, 0.0) + float(value)
  result = finalize(sums)
  result["examples"] = len(batches) * batch_size
  return result
