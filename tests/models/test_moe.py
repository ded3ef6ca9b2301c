"""The MoE layer on many devices and in 8 bits: MXFP8 weights resident on the device
(``models.mxfp8``, the grouped matmul's scaled kernel), expert parallelism (``shard_map`` over
the expert x tensor axes) and sharded random init, against the unsharded, dequantised model.
Runs on the test process's 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import models
from models import checkpoint
from models import config as config_lib
from models import grouped_matmul as gm
from models import mxfp8
from models import sharding

TINY = models.preset("tiny")


def test_mxfp8_round_trip_on_host_and_device():
  """Quantisation is the same in NumPy and jax, dequantisation is exact, and each element's
  error is within E4M3's half-ulp (2^-4 of its value; 2^-10 of its block's scale among the
  subnormals), K not a multiple of 32 included."""
  w = np.random.default_rng(0).normal(size=(3, 70, 5)).astype(np.float32)
  w[1, 32:64] *= 1e-3  # a block of small values gets its own, smaller scale
  values, scales = mxfp8.quantize(w)
  assert values.dtype == ml_dtypes.float8_e4m3fn and scales.dtype == np.uint8
  assert scales.shape == mxfp8.scale_shape(w.shape) == (3, 3, 5)
  dev_values, dev_scales = mxfp8.quantize(jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(dev_scales), scales)
  np.testing.assert_array_equal(np.asarray(dev_values).view(np.uint8), values.view(np.uint8))
  back = mxfp8.dequantize(values, scales, np.float32)
  np.testing.assert_array_equal(np.asarray(mxfp8.dequantize(dev_values, dev_scales,
                                                            jnp.float32)), back)
  step = np.repeat(mxfp8.factors(scales), mxfp8.BLOCK, axis=-2)[:, :70]
  assert np.all(np.abs(back - w) <= np.abs(w) * 2.0 ** -4 + step * 2.0 ** -10)
  assert np.abs(back - w).max() > 0  # a real rounding
  assert np.all(scales[1, 1] + 8 <= scales[1, 0])  # the small block's own scale: 2^-8 or less
  with pytest.raises(ValueError, match="scales must be uint8"):
    mxfp8.dequantize(values, scales[:, :2], np.float32)


@pytest.mark.parametrize("rows,used", [(24, 24), (40, 29)])
def test_scaled_grouped_matmul_kernel_matches_the_dequantised_weights(rows, used):
  """The few-row kernel dequantises 32 rows of K at a time inside the matmul; rows past the
  groups (``used`` < ``rows``: another device's experts) are never written into the others."""
  rng = np.random.default_rng(1)
  e, k, n = 4, 64, 48
  w = rng.normal(size=(e, k, n)).astype(np.float32) * rng.uniform(0.01, 10, (e, 1, n))
  values, scales = (jnp.asarray(a) for a in mxfp8.quantize(w))
  x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
  group_sizes = jnp.asarray([7, 0, used - 7 - 5, 5], jnp.int32)
  want = jax.lax.ragged_dot(x, mxfp8.dequantize(values, scales, jnp.float32), group_sizes)
  got = gm.grouped_matmul(x, values, group_sizes, scales=scales, implementation="pallas_gpu",
                          interpret=True)
  np.testing.assert_allclose(np.asarray(got[:used]), np.asarray(want[:used]), rtol=1e-5,
                             atol=1e-4)
  xla = gm.grouped_matmul(x, values, group_sizes, scales=scales, implementation="xla")
  np.testing.assert_allclose(np.asarray(xla[:used]), np.asarray(want[:used]), rtol=1e-6)


@pytest.fixture(scope="module")
def mxfp8_folder(tmp_path_factory):
  return checkpoint.write_random(str(tmp_path_factory.mktemp("mx") / "tiny"), mxfp8=True,
                                 dtype="float32")


def test_mxfp8_experts_stay_8_bit_and_give_the_dequantised_models_tokens(mxfp8_folder):
  """Loaded with ``expert_weights="mxfp8"`` the experts stay 8-bit (values as stored, scales
  beside them) and the logits equal those of the model loaded dequantised to float32."""
  dense = checkpoint.load_hf(mxfp8_folder, progress=False)
  resident = checkpoint.load_hf(mxfp8_folder, progress=False, expert_weights="mxfp8")
  moe = resident.layers[1].block_sparse_moe
  assert moe.w1[...].dtype == jnp.float8_e4m3fn and moe.w2_scale[...].dtype == jnp.uint8
  np.testing.assert_array_equal(
      np.asarray(mxfp8.dequantize(moe.w1[...], moe.w1_scale[...], jnp.float32)),
      np.asarray(dense.layers[1].block_sparse_moe.w1[...]))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 40), 0, TINY.vocab_size)
  np.testing.assert_array_equal(np.asarray(resident.forward(tokens)),
                                np.asarray(dense.forward(tokens)))
  # Saved back (dequantised) and loaded dense: the same model.
  with pytest.raises(checkpoint.CheckpointError, match="Orbax"):
    checkpoint.load(_orbax(dense, mxfp8_folder), expert_weights="mxfp8")


@pytest.mark.parametrize("weights", ["dense", "mxfp8"])
def test_a_non_finite_mxfp8_expert_is_reported(mxfp8_folder, tmp_path, weights):
  """A scale of 255 (E8M0's NaN) in one expert: named on load, dense or kept 8-bit."""
  import glob
  import shutil
  work = tmp_path / "poisoned"
  shutil.copytree(mxfp8_folder, work)
  name = "language_model.model.layers.1.block_sparse_moe.experts.2.w3.weight_scale_inv"
  for path in glob.glob(str(work / "*.safetensors")):
    header, data_start = checkpoint._header(path)
    if name in header:
      with open(path, "r+b") as f:  # the scale's first byte, in place
        f.seek(data_start + header[name]["data_offsets"][0])
        f.write(bytes([255]))
  expert = r"layers.1.block_sparse_moe.experts.\d.w3.weight.* NaN or Inf"
  with pytest.raises(checkpoint.CheckpointError, match=expert):
    checkpoint.load_hf(str(work), progress=False, expert_weights=weights)
  checkpoint.load_hf(str(work), progress=False, expert_weights=weights, check_finite=False)


def _orbax(model, folder):
  import os
  out = os.path.join(os.path.dirname(folder), "orbax")
  if not os.path.exists(out):
    checkpoint.save_orbax(model, out)
  return out


def test_mxfp8_from_a_bf16_checkpoint_is_rounded_on_load(tmp_path):
  folder = checkpoint.write_random(str(tmp_path / "bf16"), dtype="float32")
  dense = checkpoint.load_hf(folder, progress=False)
  resident = checkpoint.load_hf(folder, progress=False, expert_weights="mxfp8")
  w1 = np.asarray(dense.layers[1].block_sparse_moe.w1[...])
  moe = resident.layers[1].block_sparse_moe
  got = np.asarray(mxfp8.dequantize(moe.w1[...], moe.w1_scale[...], jnp.float32))
  want = mxfp8.dequantize(*mxfp8.quantize(w1), np.float32)
  np.testing.assert_array_equal(got, want)


def _jaxpr(model, tokens, mesh):
  with sharding.activation_sharding(mesh):
    return str(jax.make_jaxpr(lambda t: model.forward(t))(tokens))


@pytest.mark.parametrize("weights", ["dense", "mxfp8"])
@pytest.mark.parametrize("axes", [{"expert": 4, "tensor": 2}, {"expert": 2, "data": 2,
                                                                  "tensor": 2}])
def test_expert_parallel_equals_unsharded(weights, axes):
  """On a mesh with an expert axis the routed experts run in a shard_map, each device on its
  own experts (and width), summed by one psum: the logits of the unsharded model."""
  config = TINY.replace(expert_weights=weights)
  model = models.MiniMaxM3(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(3), (4, 24), 0, TINY.vocab_size)
  want = model.forward(tokens)
  mesh = sharding.make_mesh(axes)
  sharding.shard_model(model, mesh)
  assert model.layers[1].block_sparse_moe.w1[...].sharding.spec[0] == "expert"
  jaxpr = _jaxpr(model, tokens, mesh)
  assert "shard_map" in jaxpr and "psum" in jaxpr
  with sharding.activation_sharding(mesh):
    got = nnx.jit(lambda m, t: m.forward(t))(model, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)


def test_sharded_random_init_of_mxfp8_experts(tmp_path):
  """``random_init`` draws each weight in its sharding (MXFP8 experts with their scales);
  saved as a checkpoint (dequantised) and loaded dense, it is the same model."""
  mesh = sharding.make_mesh({"expert": 4, "tensor": 2})
  model = checkpoint.random_init("tiny", mesh=mesh, expert_weights="mxfp8", seed=5)
  moe = model.layers[1].block_sparse_moe
  assert moe.w1[...].dtype == jnp.float8_e4m3fn
  assert moe.w1[...].sharding.spec[0] == moe.w1_scale[...].sharding.spec[0] == "expert"
  assert len(moe.w1[...].addressable_shards[0].data) == TINY.num_experts // 4
  folder = str(tmp_path / "saved")
  checkpoint.save_hf(model, folder, config_lib.to_hf_config(model.config), dtype=np.float32)
  dense = checkpoint.load_hf(folder, progress=False)
  tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 24), 0, TINY.vocab_size)
  with sharding.activation_sharding(mesh):
    got = np.asarray(nnx.jit(lambda m, t: m.forward(t))(model, tokens))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, np.asarray(dense.forward(tokens)), atol=2e-4)
