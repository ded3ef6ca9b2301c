"""GPU backward kernels (interpret mode) against the gradient of reference.sparse_attention.

Interpret mode fills every Pallas output with NaN before the kernel runs, so an element a
kernel fails to write shows up as a non-finite gradient here. Each call is jitted (interpret
mode compiles much faster as one program) and uses small tiles so that (batch, group, block)
lists split into several work items.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msa_jax
from msa_jax import reference
from msa_jax.kernels.gpu import smem
from msa_jax.kernels.gpu import sparse_attention_bwd as bwd
from msa_jax import tuning
from tests import backward_checks as B
from tests import cases as C

@functools.partial(jax.jit, static_argnames=("block_size", "scale", "queries_per_item",
                                              "tiles_per_item"))
def _kernel_grads(q, k, v, ids, q_positions, kv_lengths, d_out, d_lse, *, block_size, scale,
                  queries_per_item=None, tiles_per_item=2):
  out, lse = reference.sparse_attention(q, k, v, ids, q_positions, kv_lengths,
                                        block_size=block_size, scale=scale)
  return bwd.sparse_attention_bwd(q, k, v, ids, q_positions, kv_lengths, out, lse, d_out,
                                  d_lse, block_size=block_size, scale=scale, interpret=True,
                                  queries_per_item=queries_per_item,
                                  tiles_per_item=tiles_per_item)


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
  dK/dV, and block 0's long list is cut into single-tile items the reduce sums up."""
  case = C.CASES["chunked_prefill_gqa8"]
  x = C.make_inputs(case, jnp.float32, seed=22)
  bs = case.block_size
  own = np.asarray(reference.own_block(x["q_positions"], x["kv_lengths"], bs))  # [B, T]
  ids = np.full((case.batch, case.q_len, case.groups, case.topk), -1, np.int32)
  ids[..., 0] = own[:, :, None]
  ids[..., 1] = 0
  ids[..., 2] = own[:, :, None]  # a repeat: counts once
  ids = jnp.asarray(ids)
  (_, dk, dv), (_, ref_dk, ref_dv) = _check(x, ids, bs, jnp.float32, seed=22,
                                            queries_per_item=1, tiles_per_item=1)
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
  """The default GPU tile (tuning table's tile_rows) rather than the small interpret tile."""
  from msa_jax import tuning
  case = C.CASES["decode8"]
  x = C.make_inputs(case, jnp.float32, seed=24)
  ids = C.random_selection(case, x, seed=24, holes=True)
  qpi = tuning.config("sparse_bwd")["tile_rows"] // (case.q_heads // case.groups)
  _check(x, ids, case.block_size, jnp.float32, seed=24, queries_per_item=qpi,
         tiles_per_item=4)


def test_public_api_gradient_uses_the_kernels(monkeypatch):
  """jax.grad through msa_jax.sparse_attention (out and lse) on the Pallas GPU path."""
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
                                    implementation="pallas_gpu", interpret=True)

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


@pytest.mark.parametrize("name,dtype", B.KL_CASES, ids=lambda v: getattr(v, "__name__", v))
def test_indexer_kl_loss_gradient(name, dtype):
  B.check_kl_grads("pallas_gpu", name, dtype, seed=31)


def test_indexer_kl_loss_unselected_keys_get_exact_zero():
  """Every query selects its own block and block 0: keys of the other blocks get exactly zero
  gradient in k_idx; the selected ones do not."""
  case = C.CASES["chunked_prefill_gqa8"]
  x = C.make_inputs(case, jnp.float32, seed=32)
  own = np.asarray(reference.own_block(x["q_positions"], x["kv_lengths"], case.block_size))
  ids = np.full((case.batch, case.q_len, case.groups, case.topk), -1, np.int32)
  ids[..., 0], ids[..., 1] = own[:, :, None], 0
  _, dki = B.check_kl_grads("pallas_gpu", "chunked_prefill_gqa8", jnp.float32, seed=32,
                            ids=jnp.asarray(ids))
  block = np.arange(case.kv_len) // case.block_size
  for b in range(case.batch):
    picked = np.isin(block, np.append(np.unique(own[b]), 0))
    assert np.all(np.asarray(dki)[b, ~picked] == 0)
    assert np.abs(np.asarray(dki)[b, picked]).max() > 0


def _smem_records():
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "results", "nvidia_h200", "smem.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_dkv_shared_memory_model_matches_the_h200():
  """The dK/dV kernel's shared-memory model against what XLA reported on an H200: every
  tile that failed to load is estimated at (or just above) the bytes it requested, every
  tile that loaded is estimated within the card's limit."""
  records = [r for r in _smem_records() if r["case"] == "bwd"]
  assert any(not r["ok"] for r in records) and any(r["ok"] for r in records)
  for r in records:
    itemsize = jnp.dtype(r["dtype"]).itemsize
    est = smem.dkv_bytes(r["tile_rows"], r["d"], r["d"], 128, itemsize)
    if r["ok"]:
      assert est <= smem.HOPPER, r
    else:
      assert r["requested"] <= est <= r["requested"] * 1.01, (r, est)


def test_dq_launch_compiled_on_the_h200():
  """The dQ kernel's launch parameters (its rows are fixed: max(16, Hq/G)) are ones that
  compiled on an H200 for every dtype, head dim and row count recorded there, and the
  setting that failed there is not the one picked."""
  cfg = tuning.DEFAULTS["sparse_bwd"]
  picked = lambda r: (r["warps"], r["stages"]) == (cfg["dq_num_warps"], cfg["dq_num_stages"])
  records = [r for r in _smem_records() if r["case"] == "dq"]
  seen = {(r["dtype"], r["d"], r["heads"]) for r in records if picked(r) and r["ok"]}
  assert {(dt, d, 16) for dt in ("bfloat16", "float16") for d in (64, 128, 256)} <= seen
  assert not [r for r in records if picked(r) and not r["ok"]]
  assert any(not r["ok"] for r in records)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_backward_tiles_fit_shared_memory(dtype, d):
  """Static check (no GPU): the dK/dV tile picked for every dtype and head dim fits Hopper's
  shared memory; where none can (float32 at 256) the error says what to do."""
  table_rows = tuning.DEFAULTS["sparse_bwd"]["tile_rows"]
  a100 = d <= 128 and dtype != "float32"  # A100's 163 KiB hold half-precision tiles only
  limits = (smem.HOPPER, smem.LIMITS["8.0"]) if a100 else (smem.HOPPER,)
  for limit in limits:
    if dtype == "float32" and d == 256:
      with pytest.raises(ValueError, match="bfloat16"):
        bwd.dkv_tile_rows(d, d, 128, dtype, 16, table_rows, limit)
      continue
    rows = bwd.dkv_tile_rows(d, d, 128, dtype, 16, table_rows, limit)
    assert 16 <= rows <= table_rows
    assert smem.dkv_bytes(rows, d, d, 128, jnp.dtype(dtype).itemsize) <= limit
    if rows < table_rows:  # the largest that fits
      assert smem.dkv_bytes(2 * rows, d, d, 128, jnp.dtype(dtype).itemsize) > limit
  # The tiles of the failures recorded on the H200 are now halved.
  assert bwd.dkv_tile_rows(128, 128, 128, "float32", 16, 128, smem.HOPPER) == 32
  assert bwd.dkv_tile_rows(128, 128, 128, "bfloat16", 16, 128, smem.HOPPER) == 128
