"""The Mosaic GPU (Hopper TMA + wgmma) sparse attention kernel under the Mosaic GPU interpreter.

The interpreter runs the producer and compute warpgroups as concurrent threads, simulates the
TMA copies and barriers (raising on a barrier phase a thread missed), fills fresh memory with
NaN and detects data races with vector clocks. A deadlock would hang it, so each run has a
watchdog. The Pallas -> Mosaic GPU lowering is checked by exporting for CUDA on CPU. On a GPU
(``JAX_PLATFORMS=cuda``) the same tests run the compiled kernel. The module docstring of
``ops/sparse_attention/gpu_mosaic.py`` says what none of this covers (Mosaic's passes, ptxas, speed).
"""

import contextlib
import faulthandler

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msa_jax
from msa_jax import reference
from msa_jax import schedule as sched
from msa_jax.ops.common import mosaic_gpu as common
from msa_jax.ops.sparse_attention import gpu_mosaic as mgpu
from msa_jax import tuning
from tests import cases as C

try:
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
except ImportError:  # a jax without the Mosaic GPU interpreter
  gpu_interpret = None
InterpretGPUParams = common.interpret_params_class()

pytestmark = pytest.mark.skipif(
    (gpu_interpret is None or InterpretGPUParams is None) and jax.default_backend() != "gpu",
    reason="Mosaic GPU interpret mode not in this jax")

# Shapes the kernel supports (bf16, D and Bk multiples of 64, Hq/G a multiple of 8), kept small.
CASES = {
    # Chunked prefill, 8 heads per group (8 positions per 64-row tile), explicit positions.
    "chunked_gqa8": C.Case("chunked_gqa8", batch=2, q_len=24, kv_len=256, q_heads=16, groups=2,
                           head_dim=64, block_size=64, topk=3, kv_lengths=(232, 150),
                           first_position=(208, 126)),
    # Causal prefill, 16 heads per group (4 positions per tile), S not a multiple of Bk.
    "prefill_gqa16": C.Case("prefill_gqa16", batch=1, q_len=40, kv_len=200, q_heads=16,
                            groups=1, head_dim=64, block_size=64, topk=3),
}


# On a GPU (``JAX_PLATFORMS=cuda pytest -m "" -n 0 tests/ops/sparse_attention/test_gpu_mosaic.py``: all tests, one
# process, as workers would each claim the GPU's memory) the same tests run the
# compiled kernel instead of the interpreter.
ON_GPU = jax.default_backend() == "gpu"


@contextlib.contextmanager
def interpreted(seconds=300):
  """Fresh interpreter state; fail on races; kill the process on a (barrier) deadlock."""
  if ON_GPU:
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
      yield False
    finally:
      faulthandler.cancel_dump_traceback_later()
    return
  gpu_interpret.reset_gpu_interpret_mode_state()
  faulthandler.dump_traceback_later(seconds, exit=True)
  try:
    yield InterpretGPUParams(detect_races=True, uninitialized_memory="nan")
  finally:
    faulthandler.cancel_dump_traceback_later()
  assert not gpu_interpret.get_races().races_found, "data race in the Mosaic GPU kernel"


@pytest.mark.parametrize("name,tiles_per_item,num_ctas,stages,kv_stages", [
    ("chunked_gqa8", 2, 3, 2, 2),  # 2 compute warpgroups; more CTAs than some chunks need
    ("chunked_gqa8", 2, 2, 3, 2),  # 3 q slots
    ("prefill_gqa16", 1, 2, 2, 3),  # 1 compute warpgroup; 3 K/V slots
])
def test_every_partial_slot_written(name, tiles_per_item, num_ctas, stages, kv_stages):
  """Each selected (query, block) slot holds that block's attention (bf16, NaN-filled memory).

  The two rings are checked by the interpreter's barrier and race checks: a slot released
  before its last wgmma read it fails here (tried by injecting it)."""
  case = CASES[name]
  x = C.make_inputs(case, jnp.bfloat16, seed=21)
  ids = C.random_selection(case, x, seed=21)
  nb = reference.cdiv(case.kv_len, case.block_size)
  valid = reference.valid_block_mask(ids, nb)
  heads = case.q_heads // case.groups
  per_tile, per_item = mgpu.work_item_size(heads, tile_rows=64, tiles_per_item=tiles_per_item)
  assert per_tile * heads == 64
  pad = nb * case.block_size - case.kv_len
  kp = jnp.pad(x["k"], ((0, 0), (0, pad), (0, 0), (0, 0)))
  vp = jnp.pad(x["v"], ((0, 0), (0, pad), (0, 0), (0, 0)))
  schedule = sched.build_schedule(ids, valid, x["q_positions"], nb, per_item)
  # Some items see only part of their block (the mask runs) and some all of it (it is skipped).
  items = np.asarray(schedule.items)[:int(schedule.num_items)]
  last = np.minimum(np.asarray(x["q_positions"]).max(), case.kv_len - 1)
  assert np.any(items[:, sched.ITEM_BLOCK] * case.block_size + case.block_size - 1 > last)
  assert np.any(items[:, sched.ITEM_BLOCK] * case.block_size + case.block_size - 1 <= last)
  scale = 1 / np.sqrt(case.head_dim)
  with interpreted() as params:
    p_out, p_lse = mgpu.sparse_attention_partials(
        x["q"], kp, vp, schedule, x["kv_lengths"], block_size=case.block_size, scale=scale,
        topk=case.topk, queries_per_tile=per_tile, tiles_per_item=tiles_per_item,
        num_ctas=num_ctas, num_stages=stages, kv_stages=kv_stages, interpret=params)
    p_out.block_until_ready()
  f32 = lambda a: a.astype(jnp.float32)
  for s in range(case.topk):
    want_out, want_lse = reference.sparse_attention(
        f32(x["q"]), f32(x["k"]), f32(x["v"]), ids[..., s:s + 1], x["q_positions"],
        x["kv_lengths"], block_size=case.block_size, scale=scale)
    mask = np.repeat(np.asarray(valid[..., s]), heads, axis=2)  # [B,T,Hq]
    got_lse, ref_lse = np.asarray(p_lse[s])[mask], np.asarray(want_lse)[mask]
    np.testing.assert_array_equal(np.isfinite(got_lse), np.isfinite(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(got_lse[fin], ref_lse[fin], atol=1e-4)
    got = np.asarray(f32(p_out[s]))[mask]
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np.asarray(want_out)[mask], atol=2e-2, rtol=2e-2)
  # Combined, as the API returns it: docs/msa.md §8 bf16 tolerance against the float64 oracle.
  out, lse = sched.combine(p_out, p_lse, valid, jnp.bfloat16)
  assert C.rel_err(out, C.oracle_attention(case, x, ids)[0]) <= 1e-2


def test_api_dispatch_to_mosaic(monkeypatch):
  """``"kernel": "mosaic"`` in the sparse tuning section routes ``sparse_attention`` here
  (the union path off: a card's table may turn it on, and it would trace KV-outer twice)."""
  case = CASES["prefill_gqa16"]
  x = C.make_inputs(case, jnp.bfloat16, seed=22)
  ids = C.random_selection(case, x, seed=22)
  calls = []
  run = mgpu.sparse_attention_partials
  monkeypatch.setattr(mgpu, "sparse_attention_partials",
                      lambda *a, **kw: calls.append(kw) or run(*a, **kw))
  with tuning.override("sparse", kernel="mosaic", union_max=None), \
       interpreted() as params:
    out, lse = msa_jax.sparse_attention(x["q"], x["k"], x["v"], ids, block_size=case.block_size,
                                        kv_lengths=x["kv_lengths"], return_lse=True,
                                        implementation="pallas_gpu", interpret=params)
    out.block_until_ready()
  assert len(calls) == 1 and calls[0]["queries_per_tile"] == 4  # 64 rows of 16 heads
  ref_out, ref_lse = C.oracle_attention(case, x, ids)
  assert C.rel_err(out, ref_out) <= 1e-2
  fin = np.isfinite(ref_lse)
  np.testing.assert_allclose(np.asarray(lse)[fin], ref_lse[fin], atol=1e-3)


def test_supports():
  q = jnp.zeros((1, 8, 64, 128), jnp.bfloat16)
  kv = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
  assert mgpu.supports(q, kv, kv, 128)
  assert not mgpu.supports(q.astype(jnp.float32), kv.astype(jnp.float32),
                           kv.astype(jnp.float32), 128)  # no f32 wgmma with row-major V
  assert not mgpu.supports(q, kv, kv, 16)
  assert not mgpu.supports(q[:, :, :8], kv, kv, 128)  # 2 heads per group


@pytest.mark.parametrize("tiles_per_item,tile_rows", [(2, 64), (1, 64), (1, 128)])
def test_lowers_for_hopper_at_m3_shapes(tiles_per_item, tile_rows):
  """Pallas -> Mosaic GPU lowering (register layouts, TMA slicing of the swizzled tiles,
  wgmma operand checks) runs on CPU through ``jax.export`` for CUDA; compiling to SASS and
  running need a GPU (``scripts/gpu_check.py``)."""
  b, t, s_len, hq, g, d, bk, topk = 1, 256, 1024, 64, 4, 128, 128, 16
  per_tile, per_item = mgpu.work_item_size(hq // g, tile_rows=tile_rows,
                                           tiles_per_item=tiles_per_item)
  nb = s_len // bk

  def partials(q, k, v, ids, pos, kvl):
    valid = reference.valid_block_mask(ids, nb)
    schedule = sched.build_schedule(ids, valid, pos, nb, per_item)
    return mgpu.sparse_attention_partials(q, k, v, schedule, kvl, block_size=bk, scale=d**-0.5,
                                          topk=topk, queries_per_tile=per_tile,
                                          tiles_per_item=tiles_per_item, num_ctas=132)

  assert C.lowers_to_mosaic_gpu(partials, *C.attention_specs(b, t, s_len, hq, g, d, topk))


@pytest.mark.parametrize("union_max", [0, 1000])  # KV-outer, then the union-tile kernel
def test_masked_nan_values_do_not_reach_outputs(union_max):
  """Through the API with the Mosaic kernels: NaN values past the lengths and at a key only
  later queries see leave the other queries exact; the queries that see it get NaN."""
  case = CASES["chunked_gqa8"]
  x = C.make_inputs(case, jnp.bfloat16, seed=23)
  ids = C.random_selection(case, x, seed=23)
  live = np.arange(case.kv_len)[None, :] < np.asarray(x["kv_lengths"])[:, None]
  v = jnp.where(live[:, :, None, None], x["v"], jnp.nan)
  # A NaN at sequence 0's key 220, inside its length (232): visible to positions >= 220 only.
  v = v.at[0, 220, :, 0].set(jnp.nan)
  with tuning.override("sparse", kernel="mosaic", union_max=union_max), \
      interpreted() as params:
    out = msa_jax.sparse_attention(x["q"], x["k"], v, ids, block_size=case.block_size,
                                   q_positions=x["q_positions"], kv_lengths=x["kv_lengths"],
                                   implementation="pallas_gpu", interpret=params)
    out = np.asarray(out.astype(jnp.float32))
  f32 = lambda a: np.asarray(a, np.float32)
  clean = np.where(np.isnan(f32(v)), 0.0, f32(v))
  want, _ = reference.sparse_attention(f32(x["q"]), f32(x["k"]), clean, ids, x["q_positions"],
                                       x["kv_lengths"], block_size=case.block_size,
                                       scale=1 / np.sqrt(case.head_dim))
  want = np.asarray(want)
  # Who sees key 220 of sequence 0 (group 0 or 1 selects block 220 // Bk, at position >= 220).
  pos = np.asarray(x["q_positions"])[0]
  blk = 220 // case.block_size
  sees = np.zeros(out.shape[:3], bool)
  for gi in range(case.groups):
    hit = (np.asarray(ids)[0, :, gi] == blk).any(-1) & (pos >= 220)
    sees[0, :, gi * case.q_heads // case.groups:(gi + 1) * case.q_heads // case.groups] = \
        hit[:, None]
  assert sees.any() and (~sees).any()
  assert np.isnan(out[sees]).any(axis=-1).all()
  np.testing.assert_allclose(out[~sees], want[~sees], atol=3e-2, rtol=3e-2)
