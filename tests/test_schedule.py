"""schedule.py: the inverse map and the LSE combine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import reference
from msa_jax import schedule as sched
from tests import cases as C


@pytest.mark.parametrize("qpi", [1, 3, 8])
def test_schedule_covers_every_selected_slot_once(qpi):
  case = C.CASES["prefill_padding"]
  x = C.make_inputs(case, jnp.float32, seed=31)
  ids = C.random_selection(case, x, seed=31, holes=True)
  nb = reference.cdiv(case.kv_len, case.block_size)
  valid = reference.valid_block_mask(ids, nb)
  s = jax.jit(sched.build_schedule, static_argnums=(3, 4))(ids, valid, x["q_positions"], nb,
                                                           qpi)
  items = np.asarray(s.items)
  b_, t_, g_, k_ = ids.shape
  assert items.shape[0] == s.max_items >= int(s.num_items)
  assert np.all(items[int(s.num_items):, sched.ITEM_COUNT] == 0)
  assert np.all((items[:, sched.ITEM_COUNT] >= 0) & (items[:, sched.ITEM_COUNT] <= qpi))
  seen = []
  ids_np, valid_np = np.asarray(ids), np.asarray(valid)
  pos = np.asarray(x["q_positions"])
  for b, g, blk, start, count in items[:int(s.num_items)]:
    assert count > 0
    for e in range(start, start + count):
      qrow, orow = int(s.q_rows[e]), int(s.out_rows[e])
      t, gg = (qrow // g_) % t_, qrow % g_
      slot = orow // (b_ * t_ * g_)
      assert (qrow // g_) // t_ == b and gg == g  # the entry belongs to this item's list
      assert ids_np[b, t, g, slot] == blk and valid_np[b, t, g, slot]
      assert int(s.positions[e]) == pos[b, t]
      seen.append(orow)
  assert len(seen) == len(set(seen)) == int(valid_np.sum())


def test_hot_block_is_split_across_items():
  # Every query selects block 0: its list must be cut into items of qpi entries.
  b, t, g, k, nb, qpi = 1, 50, 1, 2, 8, 4
  ids = jnp.stack([jnp.zeros((b, t, g), jnp.int32), jnp.full((b, t, g), 5, jnp.int32)], -1)
  valid = jnp.ones((b, t, g, k), bool)
  s = sched.build_schedule(ids, valid, jnp.arange(t, dtype=jnp.int32)[None], nb, qpi)
  items = np.asarray(s.items)[:int(s.num_items)]
  block0 = items[items[:, sched.ITEM_BLOCK] == 0]
  assert len(block0) == -(-t // qpi)
  assert block0[:, sched.ITEM_COUNT].sum() == t


def test_combine_matches_logsumexp():
  rng = np.random.default_rng(0)
  k, b, t, g, hpg, dv = 4, 2, 5, 2, 3, 6
  p_out = jnp.asarray(rng.standard_normal((k, b, t, g * hpg, dv)), jnp.float32)
  p_lse = jnp.asarray(rng.standard_normal((k, b, t, g * hpg)), jnp.float32)
  valid = jnp.asarray(rng.random((b, t, g, k)) < 0.6)
  # Garbage in unwritten slots must not leak, NaN included.
  slot_valid = np.repeat(np.moveaxis(np.asarray(valid), 3, 0), hpg, axis=3)
  p_out = jnp.where(slot_valid[..., None], p_out, jnp.nan)
  p_lse = jnp.where(slot_valid, p_lse, jnp.nan)
  out, lse = sched.combine(p_out, p_lse, valid, jnp.float32)
  lse_np = np.where(slot_valid, np.asarray(p_lse), -np.inf)
  with np.errstate(divide="ignore", invalid="ignore"):
    want_lse = np.log(np.sum(np.exp(lse_np), axis=0))
    w = np.exp(lse_np - want_lse)
  want = np.sum(np.where(slot_valid[..., None], w[..., None] * np.nan_to_num(p_out), 0), 0)
  np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
  none = ~np.any(slot_valid, axis=0)
  assert np.all(np.asarray(out)[none] == 0) and np.all(np.isneginf(np.asarray(lse)[none]))
