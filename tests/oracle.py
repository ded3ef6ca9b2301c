"""Brute-force float64 NumPy oracles, written from docs/msa.md independently of msa_jax.

Loops over every (batch, query, group) and key; only for the small shapes of the tests.
"""

from __future__ import annotations

import numpy as np


def positions(b, t, kv_lengths, q_positions=None):
  kv_lengths = np.full(b, None) if kv_lengths is None else np.asarray(kv_lengths)
  if q_positions is not None:
    return np.asarray(q_positions, np.int64)
  return kv_lengths[:, None] - t + np.arange(t)[None, :]


def visible_keys(p, kv_len, s):
  """Sorted key ids visible to a query at position p (docs/msa.md §2)."""
  return [j for j in range(s) if j <= p and j < kv_len]


def index_topk(q_idx, k_idx, block_size, topk, q_positions, kv_lengths):
  """Selection per docs/msa.md §3 as a list-of-sets structure: sets[b][t][g] = set of block ids."""
  q_idx = np.asarray(q_idx, np.float64)
  k_idx = np.asarray(k_idx, np.float64)
  b_, t_, g_, _ = q_idx.shape
  s = k_idx.shape[1]
  out = np.full((b_, t_, g_, topk), -1, np.int64)
  for b in range(b_):
    for t in range(t_):
      p = int(q_positions[b, t])
      keys = visible_keys(p, int(kv_lengths[b]), s)
      if p < 0 or not keys:
        continue
      own = keys[-1] // block_size
      for g in range(g_):
        scores = {}
        for j in keys:
          sc = float(q_idx[b, t, g] @ k_idx[b, j])
          blk = j // block_size
          scores[blk] = max(scores.get(blk, -np.inf), sc)
        others = sorted((blk for blk in scores if blk != own), key=lambda x: (-scores[x], x))
        chosen = [own] + others[:topk - 1]
        out[b, t, g, :len(chosen)] = chosen
  return out


def sparse_attention(q, k, v, block_indices, block_size, scale, q_positions, kv_lengths):
  """Dense masked float64 attention restricted to the selected blocks (docs/msa.md §4)."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  v = np.asarray(v, np.float64)
  b_, t_, hq, _ = q.shape
  s, g_ = k.shape[1], k.shape[2]
  hpg = hq // g_
  out = np.zeros((b_, t_, hq, v.shape[-1]))
  lse = np.full((b_, t_, hq), -np.inf)
  for b in range(b_):
    for t in range(t_):
      vis = visible_keys(int(q_positions[b, t]), int(kv_lengths[b]), s)
      for h in range(hq):
        g = h // hpg
        chosen = {int(x) for x in block_indices[b, t, g] if x >= 0}
        keys = [j for j in vis if j // block_size in chosen]
        if not keys:
          continue
        logits = scale * (k[b, keys, g] @ q[b, t, h])
        m = logits.max()
        w = np.exp(logits - m)
        out[b, t, h] = w @ v[b, keys, g] / w.sum()
        lse[b, t, h] = m + np.log(w.sum())
  return out, lse


def indexer_kl_loss(q, k, q_idx, k_idx, block_indices, block_size, scale, q_positions,
                    kv_lengths):
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  q_idx = np.asarray(q_idx, np.float64)
  k_idx = np.asarray(k_idx, np.float64)
  b_, t_, hq, _ = q.shape
  s, g_ = k.shape[1], k.shape[2]
  hpg = hq // g_
  di = q_idx.shape[-1]
  total, n = 0.0, 0
  for b in range(b_):
    for t in range(t_):
      vis = visible_keys(int(q_positions[b, t]), int(kv_lengths[b]), s)
      counted = False
      for g in range(g_):
        chosen = {int(x) for x in block_indices[b, t, g] if x >= 0}
        keys = [j for j in vis if j // block_size in chosen]
        if not keys:
          continue
        counted = True
        teacher = np.zeros(len(keys))
        for h in range(g * hpg, (g + 1) * hpg):
          lg = scale * (k[b, keys, g] @ q[b, t, h])
          e = np.exp(lg - lg.max())
          teacher += e / e.sum() / hpg
        li = (k_idx[b, keys] @ q_idx[b, t, g]) / np.sqrt(di)
        log_p = li - li.max() - np.log(np.exp(li - li.max()).sum())
        nz = teacher > 0
        total += float(np.sum(teacher[nz] * (np.log(teacher[nz]) - log_p[nz])))
      n += counted
  return total / (max(n, 1) * g_)


def same_sets(a, b):
  """Per (b, t, g): the selections hold the same ids (order free), -1 counts included."""
  return np.array_equal(np.sort(np.asarray(a), axis=-1), np.sort(np.asarray(b), axis=-1))
