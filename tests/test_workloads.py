"""msa_jax.workloads: structured index inputs select like a trained indexer; union_size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msa_jax
from msa_jax import workloads

N, G, D, BK, K = 2048, 2, 64, 64, 8


def _brute_union(ids, num_blocks, span):
  b, t, g, _ = ids.shape
  sizes = []
  for bi in range(b):
    for gi in range(g):
      for lo in range(0, t, span):
        run = ids[bi, lo:lo + span, gi].ravel()
        sizes.append(len({int(i) for i in run if 0 <= i < num_blocks}))
  return np.mean(sizes)


@pytest.mark.parametrize("t,span", [(64, 8), (61, 8), (10, 4)])
def test_union_size_matches_sets(t, span):
  rng = np.random.default_rng(t)
  ids = rng.integers(-1, 12, size=(2, t, 3, 5))  # -1 padding, repeats, out of range (>= 10)
  got = float(workloads.union_size(jnp.asarray(ids, jnp.int32), 10, span))
  assert got == pytest.approx(_brute_union(ids, 10, span))


def _select(q_idx, k_idx):
  return msa_jax.index_topk(q_idx, k_idx, block_size=BK, topk=K, implementation="xla")


def test_structured_selections_share_blocks_between_neighbours():
  """Sinks, the recent past and a segment's topic blocks are selected; neighbouring queries
  agree far more than on random inputs."""
  q_idx, k_idx = workloads.structured_index_inputs(
      jax.random.PRNGKey(0), 1, N, G, D, block_size=BK, recency=128.0, segment=64, topics=16,
      hits=4, features=8, dtype=jnp.float32)
  ids = _select(q_idx, k_idx)
  late = ids[0, N // 2:]  # queries with a long past
  own = (jnp.arange(N // 2, N) // BK)[:, None, None]
  assert float(jnp.mean(jnp.any(late == 0, -1))) > 0.95  # the sink block
  assert float(jnp.mean(jnp.any(late == own - 1, -1))) > 0.9  # the block just before
  keys = jax.random.split(jax.random.PRNGKey(1))
  random_ids = _select(jax.random.normal(keys[0], q_idx.shape),
                       jax.random.normal(keys[1], k_idx.shape))
  structured, random = (float(workloads.union_size(x, N // BK)) for x in (ids, random_ids))
  assert structured < 0.6 * random, (structured, random)
  assert structured >= K


def test_structured_inputs_need_room_for_topics():
  with pytest.raises(ValueError, match="topics"):
    workloads.structured_index_inputs(jax.random.PRNGKey(0), 1, 256, 1, 19, features=8)


def test_decode_queries_are_the_prefill_queries_at_their_positions():
  """query_start gives the full build's q_idx rows at those positions (up to the noise,
  drawn for the rows built) and the same k_idx: decode sees the structure prefill sees."""
  args = (jax.random.PRNGKey(3), 2, 512, 2, 48)
  kw = dict(block_size=32, recency=64.0, segment=32, features=4, noise=0.0, dtype=jnp.float32)
  q_all, k_all = workloads.structured_index_inputs(*args, **kw)
  q_last, k_last = workloads.structured_index_inputs(*args, query_start=509, **kw)
  np.testing.assert_array_equal(k_all, k_last)
  np.testing.assert_allclose(q_all[:, 509:], q_last, rtol=1e-6, atol=1e-6)


def test_selection_recall_counts_per_row():
  want = jnp.array([[[0, 1, 2, -1]], [[3, 4, -1, -1]]])  # [2, 1, 4]: 5 selected blocks
  got = jnp.array([[[2, 0, 7, -1]], [[0, 1, 2, 3]]])
  # Row 0 keeps 0 and 2 of {0, 1, 2}; row 1 keeps 3 of {3, 4}: ids elsewhere do not count.
  assert workloads.selection_recall(got, want) == pytest.approx(3 / 5)
  assert workloads.selection_recall(want, want) == 1.0
