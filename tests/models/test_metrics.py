"""models/metrics.py, models/losses.py, models/data.py against hand-checked cases and NumPy."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msa_jax
from models import data, losses, metrics


# ----------------------------------------------------------------------------- recall metrics


def test_recall_hand_checked():
  # One sequence, blocks of 2 tokens; query 0 at p=7 sees blocks 0..3 (own block 3), query 1
  # at p=1 sees only block 0. Two groups, k=2.
  pos = jnp.array([[7, 1]], jnp.int32)
  mass = jnp.zeros((1, 2, 2, 4), jnp.float32)
  mass = mass.at[0, 0, :].set(jnp.array([0.1, 0.5, 0.15, 0.25]))
  mass = mass.at[0, 1, :].set(jnp.array([1.0, 0.0, 0.0, 0.0]))
  # I* for query 0 = {3 (own, forced), 1 (largest other)}.
  ids = jnp.array([[[[3, 2], [1, 3]], [[0, -1], [0, -1]]]], jnp.int32)
  best = metrics.main_topk_blocks(mass, pos, topk=2, block_size=2)
  assert np.asarray(best[0, 0, 0]).tolist() == [False, True, False, True]
  assert np.asarray(best[0, 1, 0]).tolist() == [True, False, False, False]
  block, score, valid, beyond = metrics.indexer_recall(mass, ids, pos, topk=2, block_size=2)
  np.testing.assert_allclose(np.asarray(block[0, 0]), [0.5, 1.0])
  np.testing.assert_allclose(np.asarray(score[0, 0]), [0.25 / 0.75, 1.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(block[0, 1]), [1.0, 1.0])
  np.testing.assert_allclose(np.asarray(score[0, 1]), [1.0, 1.0])
  assert np.asarray(valid).all()
  assert np.asarray(beyond[0, :, 0]).tolist() == [True, False]  # 4 > k blocks; 1 <= k


def test_main_topk_ties_go_to_the_lower_block():
  pos = jnp.array([[9]], jnp.int32)  # own block 4 of 5 (Bk 2)
  mass = jnp.array([[[[0.2, 0.3, 0.3, 0.2, 0.0]]]], jnp.float32)
  best = metrics.main_topk_blocks(mass, pos, topk=3, block_size=2)
  assert np.asarray(best[0, 0, 0]).tolist() == [False, True, True, False, True]


def _numpy_mass(q, k, block_size):
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, hq, d = q.shape
  g = k.shape[2]
  nb = -(-t // block_size)
  out = np.zeros((b, t, g, nb))
  for bi in range(b):
    for ti in range(t):
      for h in range(hq):
        gi = h // (hq // g)
        s = k[bi, :ti + 1, gi] @ q[bi, ti, h] / np.sqrt(d)
        p = np.exp(s - s.max())
        p /= p.sum()
        for j in range(ti + 1):
          out[bi, ti, gi, j // block_size] += p[j] / (hq // g)
  return out


def _numpy_recall(mass, ids, block_size, topk):
  b, t, g, nb = mass.shape
  block = np.zeros((b, t, g))
  score = np.zeros((b, t, g))
  for bi in range(b):
    for ti in range(t):
      own = ti // block_size
      for gi in range(g):
        others = sorted((j for j in range(own)), key=lambda j: (-mass[bi, ti, gi, j], j))
        best = {own, *others[:topk - 1]}
        picked = {int(x) for x in ids[bi, ti, gi] if x >= 0}
        both = best & picked
        block[bi, ti, gi] = len(both) / len(best)
        score[bi, ti, gi] = (sum(mass[bi, ti, gi, j] for j in both)
                             / sum(mass[bi, ti, gi, j] for j in best))
  return block, score


def test_mass_and_recall_match_numpy_on_random_data():
  b, t, hq, g, d, bs, k = 2, 37, 4, 2, 8, 4, 3
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (b, t, hq, d)) * 2
  kk = jax.random.normal(ks[1], (b, t, g, d)) * 2
  mass = jax.jit(functools.partial(metrics.block_attention_mass, block_size=bs,
                                   chunk_size=16))(q, kk)  # 3 chunks
  want = _numpy_mass(q, kk, bs)
  np.testing.assert_allclose(np.asarray(mass), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(mass).sum(-1), 1.0, atol=1e-5)
  q_idx = jax.random.normal(ks[2], (b, t, g, d))
  k_idx = jax.random.normal(ks[3], (b, t, d))
  ids = jax.jit(functools.partial(msa_jax.index_topk, block_size=bs, topk=k,
                                  implementation="xla"))(q_idx, k_idx)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  recall = jax.jit(functools.partial(metrics.indexer_recall, topk=k, block_size=bs))
  block, score, valid, beyond = recall(mass, ids, pos)
  want_block, want_score = _numpy_recall(want, np.asarray(ids), bs, k)
  np.testing.assert_allclose(np.asarray(block), want_block, atol=1e-6)
  np.testing.assert_allclose(np.asarray(score), want_score, atol=1e-5)
  assert np.asarray(valid).all()
  np.testing.assert_array_equal(np.asarray(beyond[:, :, 0]),
                                np.broadcast_to(np.arange(t) // bs + 1 > k, (b, t)))
  assert 0.0 < float(block.mean()) < 1.0  # a random indexer misses some blocks
  # A perfect indexer (selecting I* itself) scores exactly 1.
  best = metrics.main_topk_blocks(mass, pos, topk=k, block_size=bs)
  perfect = jnp.where(best, jnp.arange(best.shape[-1]), -1)
  block, score, _, _ = recall(mass, perfect, pos)
  np.testing.assert_allclose(np.asarray(block), 1.0)
  np.testing.assert_allclose(np.asarray(score), 1.0, atol=1e-6)


def _numpy_peak(q, k, block_size):
  """Largest group-mean token probability per block (float64)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, hq, d = q.shape
  g = k.shape[2]
  hpg = hq // g
  out = np.zeros((b, t, g, -(-t // block_size)))
  for bi in range(b):
    for ti in range(t):
      for gi in range(g):
        p = np.zeros(ti + 1)
        for h in range(gi * hpg, (gi + 1) * hpg):
          s = k[bi, :ti + 1, gi] @ q[bi, ti, h] / np.sqrt(d)
          e = np.exp(s - s.max())
          p += e / e.sum() / hpg
        for j in range(ti + 1):
          out[bi, ti, gi, j // block_size] = max(out[bi, ti, gi, j // block_size], p[j])
  return out


def test_peak_and_oracle_recall():
  b, t, hq, g, d, bs, k = 1, 45, 4, 2, 8, 8, 3
  ks = jax.random.split(jax.random.PRNGKey(3), 2)
  q = jax.random.normal(ks[0], (b, t, hq, d))
  kk = jax.random.normal(ks[1], (b, t, g, d))
  mass, peak = jax.jit(functools.partial(metrics.block_attention_mass, block_size=bs,
                                         chunk_size=8, with_peak=True))(q, kk)
  np.testing.assert_allclose(np.asarray(mass), _numpy_mass(q, kk, bs), atol=1e-5)
  np.testing.assert_allclose(np.asarray(peak), _numpy_peak(q, kk, bs), atol=1e-5)
  assert np.all(np.asarray(peak) <= np.asarray(mass) + 1e-6)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  # I*_max is what MSA's selection rule (the reference's) picks from index scores equal to the
  # log of the teacher's token probabilities: their block max is log(peak).
  oracle = metrics.main_topk_blocks(peak, pos, topk=k, block_size=bs)
  ids = msa_jax.reference.select_blocks(jnp.log(peak), pos // bs, k)
  np.testing.assert_array_equal(np.asarray(metrics.selection_mask(ids, oracle.shape[-1])),
                                np.asarray(oracle))
  block, score, _, _ = metrics.indexer_recall(mass, oracle, pos, topk=k, block_size=bs)
  maxpool, _, _, _ = metrics.indexer_recall(mass, oracle, pos, topk=k, block_size=bs,
                                            rank_by=peak)
  np.testing.assert_allclose(np.asarray(maxpool), 1.0)
  want_block, want_score = _numpy_recall(np.asarray(mass), np.asarray(
      jnp.where(oracle, jnp.arange(oracle.shape[-1]), -1)), bs, k)
  np.testing.assert_allclose(np.asarray(block), want_block, atol=1e-6)
  np.testing.assert_allclose(np.asarray(score), want_score, atol=1e-5)
  assert float(block.mean()) < 1.0  # the sum and max pools disagree on some rows


def test_accuracy_and_finalize():
  logits = jnp.array([[[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]])
  right, count = metrics.accuracy(logits, jnp.array([[1, 1, 1]]), jnp.array([[1, 1, 0]]))
  assert (float(right), float(count)) == (1.0, 2.0)
  out = metrics.finalize({"loss_sum": 2.0, "tokens": 4.0, "correct": 3.0,
                          "block_recall_sum/1": 3.0, "score_recall_sum/1": 2.0, "rows/1": 4.0,
                          "block_recall_beyond_k_sum/1": 1.0,
                          "score_recall_beyond_k_sum/1": 0.5, "rows_beyond_k/1": 2.0,
                          "block_recall_scored_sum/1": 1.0,
                          "score_recall_scored_sum/1": 0.5, "rows_scored/1": 1.0,
                          "block_recall_sum/2": 1.0, "score_recall_sum/2": 1.0, "rows/2": 4.0,
                          "block_recall_beyond_k_sum/2": 0.0,
                          "score_recall_beyond_k_sum/2": 0.0, "rows_beyond_k/2": 0.0,
                          "block_recall_scored_sum/2": 0.0,
                          "score_recall_scored_sum/2": 0.0, "rows_scored/2": 0.0})
  assert out["accuracy"] == 0.75 and out["loss"] == 0.5
  assert out["perplexity"] == pytest.approx(np.exp(0.5))
  assert out["layers"]["1"]["block_recall"] == 0.75
  assert out["layers"]["1"]["score_recall_beyond_k"] == 0.25
  assert out["layers"]["1"]["block_recall_scored"] == 1.0
  assert out["layers"]["2"]["block_recall_scored"] is None  # no rows: no value
  assert out["block_recall"] == (0.75 + 0.25) / 2  # mean over layers with rows
  assert out["block_recall_scored"] == 1.0 and out["score_recall_scored"] == 0.5


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("t,chunk", [(40, 16), (33, 64)])
def test_causal_kl_equals_msa_kl_with_every_block(t, chunk):
  b, hq, g, d, di, bs = 2, 4, 2, 8, 8, 8
  ks = jax.random.split(jax.random.PRNGKey(t), 4)
  q = jax.random.normal(ks[0], (b, t, hq, d)) * 2
  k = jax.random.normal(ks[1], (b, t, g, d)) * 2
  qi = jax.random.normal(ks[2], (b, t, g, di))
  ki = jax.random.normal(ks[3], (b, t, di))
  nb = -(-t // bs)
  every = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (b, t, g, nb))
  want, want_g = jax.jit(jax.value_and_grad(
      lambda qi, ki: msa_jax.indexer_kl_loss(q, k, qi, ki, every, block_size=bs),
      argnums=(0, 1)))(qi, ki)
  got, got_g = jax.jit(jax.value_and_grad(
      lambda qi, ki: losses.causal_indexer_kl_loss(q, k, qi, ki, chunk_size=chunk),
      argnums=(0, 1)))(qi, ki)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for a, w in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), atol=1e-6)
  # The teacher is detached: no gradient into q or k.
  gq = jax.jit(jax.grad(lambda q: losses.causal_indexer_kl_loss(q, k, qi, ki)))(q)
  assert float(jnp.abs(gq).max()) == 0.0


def test_block_pooled_causal_kl_matches_numpy():
  """pool="block": KL(teacher block mass || softmax over visible blocks of the max-pooled
  index scores), against float64 NumPy; gradients finite, none into q or k."""
  b, t, hq, g, d, di, bs = 1, 37, 4, 2, 8, 8, 8
  ks = jax.random.split(jax.random.PRNGKey(5), 4)
  q = jax.random.normal(ks[0], (b, t, hq, d)) * 2
  k = jax.random.normal(ks[1], (b, t, g, d)) * 2
  qi = jax.random.normal(ks[2], (b, t, g, di))
  ki = jax.random.normal(ks[3], (b, t, di))
  f = jax.jit(jax.value_and_grad(lambda q, qi, ki: losses.causal_indexer_kl_loss(
      q, k, qi, ki, chunk_size=16, pool="block", block_size=bs), argnums=(0, 1, 2)))
  got, (gq, gqi, gki) = f(q, qi, ki)
  mass = _numpy_mass(q, k, bs)  # [B, T, G, nb] teacher block mass
  qi64, ki64 = np.asarray(qi, np.float64), np.asarray(ki, np.float64)
  total = 0.0
  for ti in range(t):
    for gi in range(g):
      s = ki64[0, :ti + 1] @ qi64[0, ti, gi] / np.sqrt(di)
      nvis = ti // bs + 1
      pooled = np.array([s[j * bs:(j + 1) * bs].max() for j in range(nvis)])
      log_p = pooled - pooled.max() - np.log(np.exp(pooled - pooled.max()).sum())
      p_t = mass[0, ti, gi, :nvis]
      total += np.sum(np.where(p_t > 0, p_t * (np.log(np.where(p_t > 0, p_t, 1)) - log_p), 0))
  np.testing.assert_allclose(float(got), total / (t * g), rtol=1e-5)
  assert float(jnp.abs(gq).max()) == 0.0
  assert np.all(np.isfinite(gqi)) and float(jnp.abs(gqi).max()) > 0
  assert np.all(np.isfinite(gki)) and float(jnp.abs(gki).max()) > 0
  with pytest.raises(ValueError, match="pool"):
    losses.causal_indexer_kl_loss(q, k, qi, ki, pool="mean")


def test_token_cross_entropy():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75]]]))
  total, count = losses.token_cross_entropy(logits, jnp.array([[0, 1]]), jnp.array([[0, 1]]))
  assert float(count) == 1.0 and float(total) == pytest.approx(-np.log(0.75), rel=1e-6)


# ----------------------------------------------------------------------------- data


def test_retrieval_task_structure_and_determinism():
  task = data.RetrievalTask(vocab_size=64, seq_len=96, num_pairs=5, num_queries=3, seed=7)
  a = task.batch(10, 4)
  assert a["inputs"].shape == a["targets"].shape == a["loss_mask"].shape == (4, 96)
  np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
  b = task.batch(12, 2)  # the same examples, however they are batched
  np.testing.assert_array_equal(a["inputs"][2:], b["inputs"])
  assert not np.array_equal(task.batch(10, 1, "eval")["inputs"], a["inputs"][:1])
  assert not np.array_equal(
      data.RetrievalTask(64, 96, 5, 3, seed=8).batch(10, 1)["inputs"], a["inputs"][:1])
  for i in range(4):
    tokens, answer_pos, values = task.example(10 + i)
    np.testing.assert_array_equal(tokens[:-1], a["inputs"][i])
    assert a["loss_mask"][i].sum() == 3
    np.testing.assert_array_equal(np.flatnonzero(a["loss_mask"][i]), answer_pos)
    np.testing.assert_array_equal(a["targets"][i, answer_pos], values)
    stored = {}
    for p in np.flatnonzero(tokens[:task.context_len] == task.PAIR):
      stored[int(tokens[p + 1])] = int(tokens[p + 2])
    assert len(stored) == 5  # distinct keys, none overwritten
    for j in range(3):  # every query asks a stored key and its answer is the stored value
      assert a["inputs"][i, answer_pos[j] - 1] == task.QUERY
      key = int(a["inputs"][i, answer_pos[j]])
      assert stored[key] == values[j]
  with pytest.raises(ValueError, match="too short"):
    data.RetrievalTask(64, 20, num_pairs=8)


def test_retrieval_task_repeats_score_every_later_occurrence():
  task = data.RetrievalTask(vocab_size=64, seq_len=128, num_pairs=4, num_queries=2, seed=3,
                            repeats=3)
  for i in range(5):
    tokens, answer_pos, values = task.example(i)
    starts = np.flatnonzero(tokens[:task.context_len] == task.PAIR)
    assert len(starts) == 12  # 4 pairs x 3
    occurrences = {}
    for p in starts:  # in position order: each key always carries the same value
      occurrences.setdefault(int(tokens[p + 1]), []).append((int(p), int(tokens[p + 2])))
    assert len(occurrences) == 4 and all(len(o) == 3 for o in occurrences.values())
    assert all(len({v for _, v in o}) == 1 for o in occurrences.values())
    later = sorted(p + 1 for o in occurrences.values() for p, _ in o[1:])
    np.testing.assert_array_equal(answer_pos[:-2], later)  # targets: the value after the key
    np.testing.assert_array_equal(tokens[answer_pos + 1], values)
    np.testing.assert_array_equal(answer_pos[-2:], task.context_len + 3 * np.arange(2) + 1)
  batch = task.batch(0, 2)
  assert batch["loss_mask"].sum() == 2 * (4 * 2 + 2)
  with pytest.raises(ValueError, match="too short"):
    data.RetrievalTask(64, 40, num_pairs=4, repeats=4)


def test_retrieval_task_fused_pairs():
  task = data.RetrievalTask(vocab_size=512, seq_len=96, num_pairs=6, num_queries=4, seed=5,
                            fused=True)
  assert task.num_values == task.FUSED_VALUES and task.num_keys >= 6 and task.filler_size > 0
  pair0 = task.FIRST + task.num_keys + task.num_values
  filler0 = pair0 + task.num_pair_tokens
  for i in range(5):
    tokens, answer_pos, values = task.example(i, "eval")
    context = tokens[:task.context_len]
    places = np.flatnonzero((context >= pair0) & (context < filler0))
    assert len(places) == 6
    assert not np.isin(context, [task.PAIR, task.QUERY]).any()
    assert (context[np.setdiff1d(np.arange(len(context)), places)] >= filler0).all()
    stored = {}  # decode every pair token back into its key and value
    for p in places:
      k, v = divmod(int(context[p]) - pair0, task.num_values)
      stored[task.FIRST + k] = task.FIRST + task.num_keys + v
      assert task.pair_token(task.FIRST + k, stored[task.FIRST + k]) == context[p]
    assert len(stored) == 6  # distinct keys
    np.testing.assert_array_equal(answer_pos, task.context_len + 3 * np.arange(4) + 1)
    np.testing.assert_array_equal(tokens[answer_pos - 1], task.QUERY)
    np.testing.assert_array_equal(tokens[answer_pos + 1], values)
    assert [stored[int(k)] for k in tokens[answer_pos]] == list(values)
  batch = task.batch(0, 3)
  assert batch["loss_mask"].sum() == 3 * 4
  with pytest.raises(ValueError, match="exactly 1"):
    data.RetrievalTask(512, 96, num_pairs=6, fused=True, repeats=2)
  with pytest.raises(ValueError, match="too small"):
    data.RetrievalTask(64, 96, num_pairs=6, fused=True)  # 2 keys fit in 64 tokens


def test_text_dataset_packing_and_splits(tmp_path):
  (tmp_path / "a.txt").write_text("hello world " * 20)
  with open(tmp_path / "b.jsonl", "w") as f:
    for i in range(5):
      f.write(json.dumps({"text": f"document {i} " * 4}) + "\n")
  tok = data.ByteTokenizer()
  ds = data.TextDataset([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], tok, 16,
                        eos_id=0, eval_fraction=0.2, seed=3)
  stream = ds.stream
  assert stream.size == (240 + 1) + 5 * (len("document 0 ") * 4 + 1)  # eos after each
  windows = (stream.size - 1) // 16
  assert ds.num_train + ds.num_eval == windows and ds.num_eval == round(0.2 * windows)
  epoch = ds.batch(0, ds.num_train)
  want = sorted(tuple(stream[16 * i:16 * i + 16]) for i in range(ds.num_train))
  assert sorted(tuple(row) for row in epoch["inputs"]) == want  # each train window once
  assert not np.array_equal(epoch["inputs"][:3], [stream[16 * i:16 * i + 16] for i in range(3)])
  np.testing.assert_array_equal(epoch["targets"][:, :-1], epoch["inputs"][:, 1:])
  ev = ds.batch(0, ds.num_eval, "eval")
  np.testing.assert_array_equal(ev["inputs"][0], stream[16 * ds.num_train:16 * ds.num_train + 16])
  again = data.TextDataset([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], tok, 16,
                           eos_id=0, eval_fraction=0.2, seed=3)
  np.testing.assert_array_equal(again.batch(5, 7)["inputs"], ds.batch(5, 7)["inputs"])
  with pytest.raises(ValueError, match="vocabulary"):
    data.TextDataset([str(tmp_path / "a.txt")], tok, 16, vocab_size=100)
