"""The backward kernels of every implementation (interpret mode) against the gradient of
reference.sparse_attention: one set of tests, run for the GPU (Triton) and TPU (Mosaic)
kernels. Backend-only checks live in test_backward_gpu.py / test_backward_tpu.py.

Interpret mode fills every Pallas output with NaN before the kernel runs, so an element a
kernel fails to write shows up as a non-finite gradient here. Each call is jitted (interpret
mode compiles much faster as one program) and some use small tiles so that (batch, group,
block) lists split into several work items.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msa_jax
from msa_jax import reference
from msa_jax import tuning
from msa_jax.ops.sparse_attention import gpu_triton_bwd as gpu_bwd
from msa_jax.ops.sparse_attention import tpu_bwd as tpu_bwd
from tests import backward_checks as B
from tests import cases as C


class Backend(NamedTuple):
  implementation: str  # msa_jax's implementation= of this backend
  module: object  # its backward kernel module
  one_query_items: dict  # launch arguments cutting every list into single-query items
  production_items: object  # case -> launch arguments of the production tile
  kl_cases: list  # the indexer-KL cases run for it


BACKENDS = {
    "gpu": Backend("pallas_gpu", gpu_bwd, dict(queries_per_item=1, tiles_per_item=1),
                   lambda case: dict(queries_per_item=tuning.config("sparse_bwd").tile_rows
                                     // (case.q_heads // case.groups), tiles_per_item=4),
                   B.KL_CASES),
    "tpu": Backend("pallas_tpu", tpu_bwd, dict(queries_per_item=1),
                   lambda case: dict(queries_per_item=tpu_bwd.TILE_ROWS
                                     // (case.q_heads // case.groups)),
                   B.KL_CASES[:3]),
}


def _check(backend, *args, **params):
  return B.check(B.KERNEL_GRADS[backend], *args, **params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,dtype", B.GRAD_CASES, ids=lambda v: getattr(v, "__name__", v))
def test_backward_matches_reference(backend, name, dtype):
  """Random selections with -1 slots and repeated ids scattered inside the lists."""
  case = C.CASES[name]
  x = C.make_inputs(case, dtype, seed=21)
  ids = C.random_selection(case, x, seed=21, holes=True)
  _check(backend, x, ids, case.block_size, dtype, seed=21)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unselected_blocks_get_exact_zero_and_hot_block_splits(backend):
  """Every query picks block 0 and its own block only: the middle blocks get exactly zero
  dK/dV (from their empty work item), and block 0's long list is cut into single-query items
  whose contributions add up."""
  case = C.CASES["chunked_prefill_gqa8"]
  x = C.make_inputs(case, jnp.float32, seed=22)
  bs = case.block_size
  own = np.asarray(reference.own_block(x["q_positions"], x["kv_lengths"], bs))  # [B, T]
  ids = np.full((case.batch, case.q_len, case.groups, case.topk), -1, np.int32)
  ids[..., 0] = own[:, :, None]
  ids[..., 1] = 0
  ids[..., 2] = own[:, :, None]  # a repeat: counts once
  (_, dk, dv), (_, ref_dk, _) = _check(backend, x, jnp.asarray(ids), bs, jnp.float32, seed=22,
                                       **BACKENDS[backend].one_query_items)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_without_visible_keys(backend):
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
  (dq, dk, _), _ = _check(backend, x, ids, case.block_size, jnp.float32, seed=23)
  assert np.all(np.asarray(dq)[dead] == 0)
  assert np.all(np.asarray(dk[1]) == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_production_tile_rows(backend):
  """The backend's production tile rather than the small interpret tile."""
  case = C.CASES["decode8"]
  x = C.make_inputs(case, jnp.float32, seed=24)
  ids = C.random_selection(case, x, seed=24, holes=True)
  _check(backend, x, ids, case.block_size, jnp.float32, seed=24,
         **BACKENDS[backend].production_items(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_api_gradient_uses_the_kernels(backend, monkeypatch):
  """jax.grad through msa_jax.sparse_attention (out and lse) on the backend's Pallas path."""
  calls = []
  module = BACKENDS[backend].module
  kernel = module.sparse_attention_bwd
  monkeypatch.setattr(module, "sparse_attention_bwd",
                      lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
  case = C.CASES["decode8_gqa16"]
  x = C.make_inputs(case, jnp.float32, seed=25)
  ids = C.random_selection(case, x, seed=25, holes=True)
  bs, scale = case.block_size, 1 / np.sqrt(case.head_dim)
  pos, lens = x["q_positions"], x["kv_lengths"]

  def attention(q, k, v):
    return msa_jax.sparse_attention(q, k, v, ids, block_size=bs, scale=scale, q_positions=pos,
                                    kv_lengths=lens, return_lse=True,
                                    implementation=BACKENDS[backend].implementation,
                                    interpret=True)

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) ** 2)

  reference_fn = lambda q, k, v: reference.sparse_attention(q, k, v, ids, pos, lens,
                                                            block_size=bs, scale=scale)
  got = jax.jit(jax.grad(functools.partial(loss, attention), (0, 1, 2)))(x["q"], x["k"], x["v"])
  want = jax.jit(jax.grad(functools.partial(loss, reference_fn), (0, 1, 2)))(x["q"], x["k"],
                                                                             x["v"])
  assert calls, "the custom_vjp did not call the Pallas backward"
  for a, b in zip(got, want):
    assert C.rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("backend,name,dtype",
                         [(bk, n, d) for bk, be in BACKENDS.items() for n, d in be.kl_cases],
                         ids=lambda v: getattr(v, "__name__", v))
def test_indexer_kl_loss_gradient(backend, name, dtype):
  B.check_kl_grads(BACKENDS[backend].implementation, name, dtype, seed=31)
