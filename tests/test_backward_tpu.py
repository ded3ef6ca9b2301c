"""TPU backward kernels (interpret mode) against the gradient of reference.sparse_attention.

Mirrors tests/test_backward_gpu.py. Interpret mode fills every Pallas output with NaN before
the kernel runs, so an element a kernel fails to write shows up as a non-finite gradient here;
one case runs under the Mosaic-TPU simulator (``pltpu.InterpretParams``) with the race
detector on and uninitialised memory NaN-filled. Each call is jitted (interpret mode compiles
much faster as one program) and some use small tiles so that (batch, group, block) lists split
into several work items.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import msa_jax
from msa_jax import reference
from msa_jax.kernels.tpu import sparse_attention_bwd as bwd
from tests import backward_checks as B
from tests import cases as C


def _kernel_grads_impl(q, k, v, ids, q_positions, kv_lengths, d_out, d_lse, *, block_size,
                       scale, queries_per_item=None, interpret=True):
  out, lse = reference.sparse_attention(q, k, v, ids, q_positions, kv_lengths,
                                        block_size=block_size, scale=scale)
  return bwd.sparse_attention_bwd(q, k, v, ids, q_positions, kv_lengths, out, lse, d_out,
                                  d_lse, block_size=block_size, scale=scale,
                                  interpret=interpret, queries_per_item=queries_per_item)


_kernel_grads = jax.jit(_kernel_grads_impl,
                        static_argnames=("block_size", "scale", "queries_per_item", "interpret"))


def _check(*args, **params):
  return B.check(_kernel_grads, *args, **params)


@pytest.mark.parametrize("name,dtype", B.GRAD_CASES, ids=lambda v: getattr(v, "__name__", v))
def test_backward_matches_reference(name, dtype):
  """Random selections with -1 slots and repeated ids scattered inside the lists."""
  case = C.CASES[name]
  x = C.make_inputs(case, dtype, seed=21)
  ids = C.random_selection(case, x, seed=21, holes=True)
  _check(x, ids, case.block_size, dtype, seed=21)


def test_unselected_blocks_get_exact_zero_and_hot_block_splits():
  """Every query picks block 0 and its own block only: the middle blocks get exactly zero
  dK/dV (from their empty work item), and block 0's long list is cut into single-query items
  that accumulate in VMEM across consecutive grid steps."""
  case = C.CASES["chunked_prefill_gqa8"]
  x = C.make_inputs(case, jnp.float32, seed=22)
  bs = case.block_size
  own = np.asarray(reference.own_block(x["q_positions"], x["kv_lengths"], bs))  # [B, T]
  ids = np.full((case.batch, case.q_len, case.groups, case.topk), -1, np.int32)
  ids[..., 0] = own[:, :, None]
  ids[..., 1] = 0
  ids[..., 2] = own[:, :, None]  # a repeat: counts once
  ids = jnp.asarray(ids)
  (_, dk, dv), (_, ref_dk, _) = _check(x, ids, bs, jnp.float32, seed=22, queries_per_item=1)
  selected = np.zeros((case.batch, case.kv_len // bs), bool)
  for b in range(case.batch):
    selected[b, own[b]] = True
    selected[b, 0] = True
  for b in range(case.batch):
    for blk in range(case.kv_len // bs):
      rows = slice(blk * bs, (blk + 1) * bs)
      if not selected[b, blk]:
        assert np.all(np.asarray(dk[b, rows]) == 0) and np.all(np.asarray(dv[b, rows]) == 0)
        assert np.all(np.asarray(ref_dk[b, rows]) == 0)
  assert selected.sum() < selected.size  # the case has unselected blocks at all


def test_queries_without_visible_keys():
  """Padding positions (-1) holding valid-looking ids and a sequence with kv_length 0: their
  lse is -inf; they get zero dq and contribute nothing to dk/dv."""
  case = C.Case("no_visible", batch=2, q_len=12, kv_len=40, q_heads=4, groups=2, topk=3)
  x = C.make_inputs(case, jnp.float32, seed=23)
  pos = np.asarray(x["q_positions"]).copy()
  pos[0, :5] = -1
  x["q_positions"] = jnp.asarray(pos)
  x["kv_lengths"] = jnp.asarray([40, 0], jnp.int32)
  rng = np.random.default_rng(23)
  ids = jnp.asarray(rng.integers(-1, 3, (2, 12, 2, 3)), jnp.int32)
  lse = jax.jit(functools.partial(reference.sparse_attention, block_size=case.block_size,
                                  scale=1 / np.sqrt(case.head_dim)))(
      x["q"], x["k"], x["v"], ids, x["q_positions"], x["kv_lengths"])[1]
  dead = ~np.isfinite(np.asarray(lse))
  assert dead[0, :5].all() and dead[1].all() and not dead.all()
  (dq, dk, _), _ = _check(x, ids, case.block_size, jnp.float32, seed=23)
  assert np.all(np.asarray(dq)[dead] == 0)
  assert np.all(np.asarray(dk[1]) == 0)


def test_production_tile_rows():
  """The default TPU tile (TILE_ROWS rows) rather than the small interpret tile."""
  case = C.CASES["decode8"]
  x = C.make_inputs(case, jnp.float32, seed=24)
  ids = C.random_selection(case, x, seed=24, holes=True)
  qpi = bwd.TILE_ROWS // (case.q_heads // case.groups)
  _check(x, ids, case.block_size, jnp.float32, seed=24, queries_per_item=qpi)


def test_under_tpu_interpreter_race_free(monkeypatch):
  """Mosaic-TPU simulation of both kernels: DMA/semaphore use checked, races detected,
  uninitialised memory (scratch, outputs) NaN-filled, lists split into several items."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  states = []  # the simulator makes a fresh race state per kernel; keep each one

  class Recording(ipc.RaceDetectionState):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      states.append(self)

  monkeypatch.setattr(ipc, "RaceDetectionState", Recording)
  case = C.CASES["decode8"]
  x = C.make_inputs(case, jnp.float32, seed=26)
  ids = C.random_selection(case, x, seed=26, holes=True)
  params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
  _check(x, ids, case.block_size, jnp.float32, seed=26, queries_per_item=2, interpret=params)
  assert ipc.races is not None and not ipc.races.races_found
  assert len(states) >= 2  # the dQ and the dK/dV kernel
  assert not any(s.races_found for s in states)


def test_public_api_gradient_uses_the_kernels(monkeypatch):
  """jax.grad through msa_jax.sparse_attention (out and lse) on the Pallas TPU path."""
  calls = []
  kernel = bwd.sparse_attention_bwd
  monkeypatch.setattr(bwd, "sparse_attention_bwd",
                      lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
  case = C.CASES["decode8_gqa16"]
  x = C.make_inputs(case, jnp.float32, seed=25)
  ids = C.random_selection(case, x, seed=25, holes=True)
  bs, scale = case.block_size, 1 / np.sqrt(case.head_dim)
  pos, lens = x["q_positions"], x["kv_lengths"]

  def attention(q, k, v):
    return msa_jax.sparse_attention(q, k, v, ids, block_size=bs, scale=scale, q_positions=pos,
                                    kv_lengths=lens, return_lse=True,
                                    implementation="pallas_tpu", interpret=True)

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) ** 2)

  reference_fn = lambda q, k, v: reference.sparse_attention(q, k, v, ids, pos, lens,
                                                            block_size=bs, scale=scale)
  got = jax.jit(jax.grad(functools.partial(loss, attention), (0, 1, 2)))(x["q"], x["k"], x["v"])
  want = jax.jit(jax.grad(functools.partial(loss, reference_fn), (0, 1, 2)))(x["q"], x["k"],
                                                                             x["v"])
  assert calls, "the custom_vjp did not call the Pallas TPU backward"
  for a, b in zip(got, want):
    assert C.rel_err(a, b) <= 1e-5


def test_tpu_tiling_restrictions_raise():
  """Compiling for a TPU (interpret=False): shapes Mosaic cannot tile raise ValueError before
  any kernel is traced."""
  case = C.CASES["decode8"]  # Hq/G = 8
  x = C.make_inputs(case, jnp.float32, seed=27)
  ids = C.random_selection(case, x, seed=27)
  b, t, hq, d = x["q"].shape
  out = jnp.zeros_like(x["q"])
  lse = jnp.zeros((b, t, hq), jnp.float32)
  call = functools.partial(bwd.sparse_attention_bwd, x["q"], x["k"], x["v"], ids,
                           x["q_positions"], x["kv_lengths"], out, lse, out, scale=0.1)
  with pytest.raises(ValueError, match="block_size"):
    call(block_size=12)
  # bf16 packs 16 rows per sublane tile: 8 heads cannot be stacked into one [rows, D] tile.
  cast = lambda a: a.astype(jnp.bfloat16)
  with pytest.raises(ValueError, match="queries_per_item"):
    bwd.sparse_attention_bwd(cast(x["q"]), cast(x["k"]), cast(x["v"]), ids, x["q_positions"],
                             x["kv_lengths"], cast(out), lse, cast(out), block_size=16,
                             scale=0.1, queries_per_item=4)
  with pytest.raises(ValueError, match="block_indices"):
    bwd.sparse_attention_bwd(x["q"], x["k"], x["v"], ids[:, :1], x["q_positions"],
                             x["kv_lengths"], out, lse, out, block_size=16, scale=0.1,
                             interpret=True)


@pytest.mark.parametrize("name,dtype", B.KL_CASES[:3], ids=lambda v: getattr(v, "__name__", v))
def test_indexer_kl_loss_gradient(name, dtype):
  B.check_kl_grads("pallas_tpu", name, dtype, seed=33)
