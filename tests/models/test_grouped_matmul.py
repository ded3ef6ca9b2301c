"""models.grouped_matmul: the MoE's expert matmuls against lax.ragged_dot on random data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import grouped_matmul as gm


def _inputs(seed, p, e, k, n, dtype=jnp.float32, empty=()):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(ks[0], (p, k), dtype)
  w = jax.random.normal(ks[1], (e, k, n), dtype)
  allowed = np.array([i for i in range(e) if i not in empty])
  ids = np.sort(np.asarray(jax.random.choice(ks[2], allowed, (p,))))
  return x, w, jnp.asarray(np.bincount(ids, minlength=e), jnp.int32)


# (rows, experts, K, N, experts with no rows): decode-sized, an expert with 20 rows (two tiles),
# a row count past the small-row threshold (64-row tiles), N not a multiple of 64.
SHAPES = [(1, 8, 64, 96, ()), (5, 16, 128, 64, (0, 15)), (40, 4, 64, 64, (1,)),
          (gm.SMALL_ROWS + 30, 8, 32, 48, (3,))]


@pytest.mark.parametrize("p,e,k,n,empty", SHAPES)
def test_tiled_matches_ragged_dot(p, e, k, n, empty):
  x, w, sizes = _inputs(p, p, e, k, n, empty=empty)
  want = jax.lax.ragged_dot(x, w, sizes, precision=jax.lax.Precision.HIGHEST)
  got = gm.grouped_matmul(x, w, sizes, implementation="pallas_gpu", interpret=True)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_tile_layout_one_expert_per_tile():
  sizes = jnp.array([3, 0, 20, 1], jnp.int32)
  row, tile_expert, num_tiles = gm.tile_layout(sizes, 24, 16)
  row, tile_expert = np.asarray(row), np.asarray(tile_expert)
  assert len(set(row.tolist())) == 24  # distinct destinations
  experts = np.repeat(np.arange(4), np.asarray(sizes))
  assert (tile_expert[row // 16] == experts).all()  # each row in a tile of its expert
  assert (tile_expert[4:] == -1).all() and num_tiles >= 4  # 1 + 2 + 1 tiles used


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled kernels need a GPU")
@pytest.mark.parametrize("p", [4, 32, 4096])
def test_gpu_kernels_bf16(p):
  x, w, sizes = _inputs(7, p, 16, 384, 384, jnp.bfloat16, empty=(2,))  # K not a power of 2
  want = jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
  got = gm.grouped_matmul(x, w, sizes, implementation="pallas_gpu").astype(jnp.float32)
  err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  assert err < 1e-2, err
