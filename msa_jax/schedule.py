"""Selection -> KV-outer work lists (the inverse map), and the partial-output combine.

The forward of KV-outer sparse attention (docs/msa.md §6) turns the per-query selection
``block_indices [B,T,G,k]`` around: for every (batch, group, KV block) it lists the
(query, slot) entries that picked the block, as MoE dispatch groups tokens by expert. Each
list is cut into work items of at most ``queries_per_item`` queries, so a block that every
query selects (the first block, the recent ones) is spread over many programs instead of
serialising on one. A kernel program takes one work item: it loads that K/V block once and
attends the item's queries (``queries_per_item`` positions x the group's heads = one tile of
rows), writing a partial output and LSE into the slot the entry was assigned. ``combine``
then merges each query's <= k partials with an LSE-weighted sum.

All shapes are static under ``jit``: the number of entries is ``B*T*G*k`` and the number of
work items is bounded by ``cdiv(entries, queries_per_item) + min(B*G*num_blocks, entries)``;
unused items have ``count = 0``.

Row numbering shared with the kernels:
  * query row  ``(b*T + t)*G + g``           of ``q`` viewed as ``[B*T*G, Hq/G, D]``;
  * output row ``((s*B + b)*T + t)*G + g``   of the partial buffers viewed as
    ``[k*B*T*G + 1, Hq/G, Dv]``; the extra last row is a scratch row that masked lanes write.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from msa_jax import reference

# Column meaning of Schedule.items.
ITEM_BATCH, ITEM_GROUP, ITEM_BLOCK, ITEM_START, ITEM_COUNT = range(5)
ITEM_FIELDS = 5


def read_item(items_ref, i):
  """(batch, group, block, first entry, number of entries) of work item ``i``, read inside a
  kernel from the flattened ``items`` (``[max_items * ITEM_FIELDS]`` scalars)."""
  base = i * ITEM_FIELDS
  return tuple(items_ref[base + f] for f in range(ITEM_FIELDS))


class Schedule(NamedTuple):
  """KV-outer work list. All int32.

  items:     [max_items, 5] (batch, group, block, first entry, number of entries).
  q_rows:    [entries + queries_per_item] query row of each entry, sorted by item.
  out_rows:  [entries + queries_per_item] partial-output row (slot-major) of each entry.
  positions: [entries + queries_per_item] absolute position of each entry's query.
  num_items: [] number of items in use (the rest have count 0).
  """
  items: jax.Array
  q_rows: jax.Array
  out_rows: jax.Array
  positions: jax.Array
  num_items: jax.Array

  @property
  def max_items(self) -> int:
    return self.items.shape[0]


def max_work_items(num_entries: int, num_groups: int, queries_per_item: int) -> int:
  return reference.cdiv(num_entries, queries_per_item) + min(num_groups, num_entries)


def build_schedule(block_indices: jax.Array, valid: jax.Array, q_positions: jax.Array,
                   num_blocks: int, queries_per_item: int) -> Schedule:
  """Invert ``block_indices [B,T,G,k]`` (``valid`` marks the slots to attend) into work items."""
  b, t, g, k = block_indices.shape
  n = b * t * g * k
  num_lists = b * g * num_blocks
  bi, ti, gi, si = jnp.meshgrid(jnp.arange(b, dtype=jnp.int32), jnp.arange(t, dtype=jnp.int32),
                                jnp.arange(g, dtype=jnp.int32), jnp.arange(k, dtype=jnp.int32),
                                indexing="ij")
  ids = jnp.where(valid, block_indices, 0).astype(jnp.int32)
  # One list per (batch, group, block); invalid slots go to a sentinel list at the end.
  list_id = jnp.where(valid, (bi * g + gi) * num_blocks + ids, num_lists).reshape(n)
  order = jnp.argsort(list_id, stable=True)
  counts = jnp.bincount(list_id, length=num_lists + 1)[:num_lists].astype(jnp.int32)
  list_start = jnp.cumsum(counts) - counts

  # Cut every list into items of at most queries_per_item entries.
  items_per_list = -(-counts // queries_per_item)
  items_end = jnp.cumsum(items_per_list)
  num_items = items_end[-1]
  max_items = max_work_items(n, num_lists, queries_per_item)
  item = jnp.arange(max_items, dtype=jnp.int32)
  owner = jnp.minimum(jnp.searchsorted(items_end, item, side="right"), num_lists - 1)
  piece = item - (items_end[owner] - items_per_list[owner])
  start = list_start[owner] + piece * queries_per_item
  count = jnp.clip(counts[owner] - piece * queries_per_item, 0, queries_per_item)
  live = item < num_items
  count = jnp.where(live, count, 0)
  start = jnp.where(live, start, 0)
  owner = jnp.where(live, owner, 0)
  items = jnp.stack([owner // (g * num_blocks), (owner // num_blocks) % g, owner % num_blocks,
                     start, count], axis=1).astype(jnp.int32)

  q_rows = ((bi * t + ti) * g + gi).reshape(n)[order]
  out_rows = (((si * b + bi) * t + ti) * g + gi).reshape(n)[order]
  positions = jnp.broadcast_to(q_positions[:, :, None, None], (b, t, g, k)).reshape(n)[order]
  # Pad so a program may read queries_per_item entries from any start without going out of range.
  pad = queries_per_item
  q_rows = jnp.pad(q_rows, (0, pad))
  out_rows = jnp.pad(out_rows, (0, pad), constant_values=n)
  positions = jnp.pad(positions.astype(jnp.int32), (0, pad), constant_values=-1)
  return Schedule(items, q_rows.astype(jnp.int32), out_rows.astype(jnp.int32), positions,
                  num_items.astype(jnp.int32))


def combine(partial_out: jax.Array, partial_lse: jax.Array, valid: jax.Array, out_dtype):
  """Merge per-slot partials: ``LSE = logsumexp_s LSE_s``, ``O = sum_s exp(LSE_s - LSE) O_s``.

  partial_out [k,B,T,Hq,Dv], partial_lse [k,B,T,Hq] (f32), valid [B,T,G,k] marks written slots
  (unwritten slots hold garbage and are excluded by selection, never by multiplication).
  Returns (out [B,T,Hq,Dv] in ``out_dtype``, lse [B,T,Hq] f32); queries with no visible key
  get out = 0 and lse = -inf.
  """
  k, b, t, hq, _ = partial_out.shape
  g = valid.shape[2]
  slot_valid = jnp.repeat(jnp.moveaxis(valid, 3, 0), hq // g, axis=3)  # [k,B,T,Hq]
  lse_s = jnp.where(slot_valid, partial_lse, -jnp.inf)
  m = jnp.max(lse_s, axis=0)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse_s - m_safe)
  total = jnp.sum(w, axis=0)
  has = total != 0  # a NaN partial makes the query NaN (out and LSE), never "no keys"
  lse = jnp.where(has, m_safe + jnp.log(jnp.where(has, total, 1.0)), -jnp.inf)
  w = w / jnp.where(has, total, 1.0)
  terms = jnp.where(slot_valid[..., None], w[..., None] * partial_out.astype(jnp.float32), 0.0)
  return jnp.sum(terms, axis=0).astype(out_dtype), lse


def compact_selection(block_indices, num_blocks):
  """Valid ids (in range, first occurrence) first in a stable order, 0 after; and their count.

  int32 [B,T,G,k] and [B,T,G]: the kernels loop over ``counts`` slots only, so idle slots
  (short sequences, padding queries, repeats) read no page.
  """
  valid = reference.valid_block_mask(block_indices, num_blocks)
  # Slot of each valid id: the number of valid ids before it; a [k, k] one-hot, no sort.
  k = block_indices.shape[-1]
  earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [slot, earlier slot]
  slot = jnp.where(valid, jnp.sum(valid[..., None, :] & earlier, axis=-1), -1)
  to = slot[..., :, None] == jnp.arange(k, dtype=slot.dtype)  # [..., source, slot]
  ids = jnp.sum(jnp.where(to, block_indices[..., :, None], 0), axis=-2)
  return ids.astype(jnp.int32), jnp.sum(valid, axis=-1).astype(jnp.int32)
