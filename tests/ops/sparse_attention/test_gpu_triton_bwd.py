"""What only the GPU backward has: the indexer-KL gradient's exact zeros, and its tiles
against the H200's shared memory (the tests shared with the TPU kernels: test_backward.py)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import reference
from msa_jax.ops.common import smem
from msa_jax.ops.sparse_attention import gpu_triton_bwd as bwd
from msa_jax import tuning
from tests import backward_checks as B
from tests import cases as C
from tests import ROOT


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
  path = os.path.join(ROOT,
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
  picked = lambda r: (r["warps"], r["stages"]) == (cfg.dq_num_warps, cfg.dq_num_stages)
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
  table_rows = tuning.DEFAULTS["sparse_bwd"].tile_rows
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
