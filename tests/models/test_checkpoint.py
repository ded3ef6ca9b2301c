"""models/checkpoint.py: HF layout round trip, MXFP8, errors, sharded placement."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import models
from models import checkpoint
from models import config as config_lib
from models import sharding
from tests import call_main

TINY_JSON = json.load(open(os.path.join(config_lib.CONFIG_DIR, "tiny.json")))
TOKENS = jax.random.randint(jax.random.PRNGKey(0), (2, 40), 0, 256)  # selection active


@pytest.fixture(scope="module")
def tiny():
  return models.MiniMaxM3(models.preset("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt"))
  checkpoint.save_hf(tiny, path, TINY_JSON, dtype=np.float32, num_shards=3)
  return path


def _params(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_layout_is_the_released_one(folder):
  index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
  names = set(index["weight_map"])
  assert "language_model.lm_head.weight" in names
  assert "language_model.model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
  assert "language_model.model.layers.1.self_attn.index_k_proj.weight" in names
  assert "language_model.model.layers.0.mlp.down_proj.weight" in names
  assert not any("index_q_proj" in n for n in names if ".layers.0." in n)  # full-attn layer
  assert len(set(index["weight_map"].values())) == 3


def test_round_trip_is_exact(tiny, folder):
  loaded = checkpoint.load_hf(folder, progress=False)
  want, got = _params(tiny), _params(loaded)
  assert want.keys() == got.keys()
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
  np.testing.assert_array_equal(np.asarray(loaded.forward(TOKENS)),
                                np.asarray(tiny.forward(TOKENS)))


def test_bf16_round_trip(tiny, tmp_path):
  checkpoint.save_hf(tiny, str(tmp_path), TINY_JSON)  # bf16 on disk, router fp32
  loaded = checkpoint.load_hf(str(tmp_path), dtype=jnp.bfloat16, progress=False)
  for p, value in _params(tiny).items():
    got = _params(loaded)[p]
    if p[-1] in ("gate", "e_score_correction_bias"):
      assert got.dtype == np.float32
      np.testing.assert_array_equal(got, value)
    else:
      np.testing.assert_array_equal(got.astype(np.float32),
                                    value.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_mxfp8_dequantisation_matches_numpy():
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((6, 70)) * rng.uniform(0.01, 50, (6, 1))).astype(np.float32)
  fp8, scale = checkpoint.quantize_mxfp8(w)
  assert fp8.dtype == ml_dtypes.float8_e4m3fn and scale.shape == (6, 3) and scale.dtype == np.uint8
  got = checkpoint.dequantize_mxfp8(fp8, scale)
  want = np.array([[float(fp8[o, i]) * 2.0 ** (int(scale[o, i // 32]) - 127)
                    for i in range(70)] for o in range(6)])
  np.testing.assert_array_equal(got, want)
  assert np.max(np.abs(got - w) / np.abs(w).max(1, keepdims=True)) < 0.07  # e4m3 rounding
  one = checkpoint.dequantize_mxfp8(np.ones((1, 32), ml_dtypes.float8_e4m3fn),
                                    np.array([[128]], np.uint8))
  assert np.all(one == 2.0)  # 128 -> x2: the uint8 is a multiplier exponent, not a divisor


def test_mxfp8_checkpoint_loads_dequantised(tiny, tmp_path):
  checkpoint.save_hf(tiny, str(tmp_path), TINY_JSON, mxfp8=True)
  cfg = json.load(open(tmp_path / "config.json"))
  assert cfg["quantization_config"]["quant_method"] == "mxfp8"
  loaded = _params(checkpoint.load_hf(str(tmp_path), progress=False))
  w = _params(tiny)[("layers", 1, "self_attn", "q_proj", "kernel")].T
  fp8, scale = checkpoint.quantize_mxfp8(w.astype(ml_dtypes.bfloat16).astype(np.float32))
  np.testing.assert_array_equal(loaded[("layers", 1, "self_attn", "q_proj", "kernel")],
                                checkpoint.dequantize_mxfp8(fp8, scale).T)
  gate = _params(tiny)[("layers", 1, "block_sparse_moe", "gate")]
  np.testing.assert_array_equal(loaded[("layers", 1, "block_sparse_moe", "gate")], gate)


def test_vision_tensors_skipped(folder, tmp_path, caplog):
  work = tmp_path / "vl"
  shutil.copytree(folder, work)
  from safetensors.numpy import save_file
  save_file({"vision_tower.vision_model.pre_layrnorm.weight": np.ones(4, np.float32)},
            str(work / "vision.safetensors"))
  index = json.load(open(work / "model.safetensors.index.json"))
  index["weight_map"]["vision_tower.vision_model.pre_layrnorm.weight"] = "vision.safetensors"
  json.dump(index, open(work / "model.safetensors.index.json", "w"))
  with caplog.at_level("INFO"):
    checkpoint.load_hf(str(work), progress=False)
  assert "skipped 1 vision" in caplog.text


def _broken(folder, tmp_path, edit):
  work = tmp_path / "broken"
  shutil.copytree(folder, work)
  edit(work)
  return str(work)


def _rewrite_shard(work, fn):
  from safetensors import safe_open
  from safetensors.numpy import save_file
  index = json.load(open(work / "model.safetensors.index.json"))
  file = index["weight_map"]["language_model.model.layers.1.self_attn.q_proj.weight"]
  with safe_open(str(work / file), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  fn(tensors, index)
  save_file(tensors, str(work / file))
  json.dump(index, open(work / "model.safetensors.index.json", "w"))


Q = "language_model.model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize("edit,msg", [
    (lambda w: os.remove(next(w.glob("model-00002-*"))), "shard listed in the index is missing"),
    (lambda w: _rewrite_shard(w, lambda t, i: (t.pop(Q), i["weight_map"].pop(Q))),
     "q_proj.weight' is missing"),
    (lambda w: _rewrite_shard(w, lambda t, i: (t.update(extra=np.ones(2, np.float32)),
                                               i["weight_map"].update(extra=i["weight_map"][Q]))),
     r"unexpected tensor\(s\).*'extra'"),
    (lambda w: _rewrite_shard(w, lambda t, i: t.update({Q: t[Q][:, :-1]})),
     "q_proj.weight' has shape"),
    (lambda w: _rewrite_shard(w, lambda t, i: t.update({Q: t[Q].astype(np.int32)})),
     "unsupported dtype I32"),
    (lambda w: _rewrite_shard(w, lambda t, i: t.update(
        {Q: t[Q].astype(ml_dtypes.float8_e4m3fn)})), "has no .*weight_scale_inv"),
])
def test_errors_name_file_and_tensor(folder, tmp_path, edit, msg):
  with pytest.raises(checkpoint.CheckpointError, match=msg):
    checkpoint.load_hf(_broken(folder, tmp_path, edit), progress=False)


def test_truncated_file(folder, tmp_path):
  def truncate(w):
    path = next(w.glob("model-00001-*"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

  with pytest.raises(checkpoint.CheckpointError, match="model-00001-of-00003.safetensors"):
    checkpoint.load_hf(_broken(folder, tmp_path, truncate), progress=False)


def test_sharded_load(tiny, folder):
  mesh = sharding.make_mesh({"data": 2, "tensor": 2, "expert": 2})
  loaded = checkpoint.load_hf(folder, mesh=mesh, progress=False)
  w1 = loaded.layers[1].block_sparse_moe.w1[...]
  assert w1.sharding.spec[0] == "expert" and len(w1.sharding.device_set) == 8
  with sharding.activation_sharding(mesh):
    got = nnx.jit(lambda m, t: m.forward(t))(loaded, TOKENS)
  np.testing.assert_allclose(np.asarray(got), np.asarray(tiny.forward(TOKENS)), atol=2e-4)


def test_orbax_round_trip_bit_exact_and_resharded(tmp_path):
  src, orbax_dir, back = tmp_path / "hf", tmp_path / "orbax", tmp_path / "hf2"
  checkpoint.write_random(str(src), seed=3)  # bf16 storage, fp32 router
  for args in (["hf-to-orbax", str(src), str(orbax_dir), "--mesh", "tensor=2,expert=2"],
               ["orbax-to-hf", str(orbax_dir), str(back), "--mesh", "data=2"]):
    proc = _convert(*args)  # the test process has 8 (fake) devices
    assert proc.returncode == 0, proc.stderr[-3000:]
  from safetensors import safe_open
  def tensors(folder):
    out = {}
    for f in folder.glob("*.safetensors"):
      with safe_open(str(f), framework="numpy") as h:
        out.update({k: h.get_tensor(k) for k in h.keys()})
    return out
  a, b = tensors(src), tensors(back)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
  # Restored onto a different mesh than it was saved from, with the same logits.
  mesh = sharding.make_mesh({"expert": 4})
  restored = checkpoint.load(str(orbax_dir), mesh=mesh, dtype=jnp.bfloat16)
  assert restored.layers[1].block_sparse_moe.w1[...].sharding.spec[0] == "expert"
  direct = checkpoint.load(str(src), dtype=jnp.bfloat16, progress=False)
  np.testing.assert_array_equal(np.asarray(restored.forward(TOKENS)),
                                np.asarray(direct.forward(TOKENS)))


# ----------------------------------------------------------------------------- reliability


def _convert(*args):
  from models.cli import convert
  return call_main(convert.main, list(args))


def test_convert_refuses_a_nonempty_destination_untouched(folder, tmp_path):
  dst = tmp_path / "existing"
  dst.mkdir()
  (dst / "config.json").write_text("precious")
  proc = _convert("hf-to-orbax", folder, str(dst))
  assert proc.returncode != 0 and "not empty" in proc.stderr and "Traceback" not in proc.stderr
  assert (dst / "config.json").read_text() == "precious" and len(list(dst.iterdir())) == 1


def test_a_failed_write_leaves_no_partial_folder(tiny, tmp_path, monkeypatch):
  calls = []

  def failing_save(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 2:
      raise OSError("disk full")
    return real(tensors, path, metadata=metadata)

  real = checkpoint.save_file
  monkeypatch.setattr(checkpoint, "save_file", failing_save)
  dst = tmp_path / "out"
  with pytest.raises(OSError, match="disk full"):
    checkpoint.save_hf(tiny, str(dst), TINY_JSON, num_shards=3)
  assert not dst.exists() and list(tmp_path.iterdir()) == []  # no partial, no temporary


@pytest.mark.parametrize("make,msg", [
    (lambda p: None, "no such folder"),
    (lambda p: p.write_text("x"), "not a folder"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{}")),
     "model.safetensors.index.json"),
])
def test_load_says_what_is_missing(tmp_path, make, msg):
  path = tmp_path / "ckpt"
  make(path)
  with pytest.raises(checkpoint.CheckpointError, match=msg):
    checkpoint.load(str(path))


@pytest.mark.parametrize("name,msg", [("config.json", "config.json: malformed config.json"),
                                      ("model.safetensors.index.json",
                                       "index.json: malformed safetensors index")])
def test_malformed_json_is_named(folder, tmp_path, name, msg):
  work = _broken(folder, tmp_path, lambda w: (w / name).write_text('{"a": '))
  with pytest.raises(checkpoint.CheckpointError, match=msg):
    checkpoint.load(work, progress=False)


def test_nan_in_a_tensor_is_reported(folder, tmp_path):
  def poison(work):
    _rewrite_shard(work, lambda t, i: t[Q].__setitem__((0, 0), np.nan))

  work = _broken(folder, tmp_path, poison)
  with pytest.raises(checkpoint.CheckpointError, match="q_proj.weight holds NaN or Inf"):
    checkpoint.load_hf(work, progress=False)
  checkpoint.load_hf(work, progress=False, check_finite=False)  # explicitly allowed


@pytest.fixture(scope="module")
def orbax_folder(tiny, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("orbax") / "ckpt")
  checkpoint.save_orbax(tiny, path)
  return path


def _damage_largest_file(work):
  files = [p for p in (work / "state").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:16])


@pytest.mark.parametrize("edit", [
    _damage_largest_file,
    lambda w: (w / "state" / "_METADATA").unlink(),
    lambda w: (w / "state" / "manifest.ocdbt").unlink(),
], ids=["truncated data", "no pytree metadata", "no manifest"])
def test_damaged_orbax_checkpoint_is_reported(orbax_folder, tmp_path, edit):
  work = tmp_path / "damaged"
  shutil.copytree(orbax_folder, work)
  edit(work)
  with pytest.raises(checkpoint.CheckpointError, match="state: cannot restore"):
    checkpoint.load(str(work))


def test_orbax_of_another_config_is_reported(orbax_folder, tmp_path):
  work = tmp_path / "other"
  shutil.copytree(orbax_folder, work)
  config = json.loads((work / "config.json").read_text())
  config["text_config"]["hidden_size"] = 128
  (work / "config.json").write_text(json.dumps(config))
  with pytest.raises(checkpoint.CheckpointError, match="cannot restore"):
    checkpoint.load(str(work))
