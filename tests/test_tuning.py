"""msa_jax.tuning: per-card data keyed by shape, the config dataclasses, their defaults."""

import dataclasses
import os
import types

import pytest

from msa_jax import tuning


def test_tuning_table_lookup(monkeypatch, tmp_path):
  """Tuned data is stored per shape and looked up at the nearest shape; overrides and explicit
  arguments beat it; the configs are frozen dataclasses that refuse unknown parameters."""
  assert tuning.card_dir("NVIDIA H200") == "nvidia_h200"
  assert tuning._card_table("NVIDIA H200")["sparse"][0][1]["kernel"] in ("mosaic", "triton")
  monkeypatch.setattr(tuning, "DATA_DIR", str(tmp_path))
  tuning._card_table.cache_clear()
  try:
    short, long = {"context": 8192, "queries": 2048}, {"context": 1 << 20, "queries": 16384}
    paths = tuning.save("cpu", {"index": {"block_rows": 32}}, data_dir=str(tmp_path),
                        shapes={"index": short})
    tuning.save("cpu", {"index": {"block_rows": 128}}, data_dir=str(tmp_path),
                shapes={"index": long})
    tuning.save("cpu", {"index": {"block_rows": 16}}, data_dir=str(tmp_path),
                shapes={"index": short})  # replaces the entry of the same shape
    assert [os.path.relpath(p, tmp_path) for p in paths] == [os.path.join("cpu", "index.json")]
    assert tuning.config("index", shape={"context": 16384, "queries": 1024}).block_rows == 16
    assert tuning.config("index", shape={"context": 1 << 19, "queries": 8192}).block_rows == 128
    with tuning.override("index", block_rows=8):
      assert tuning.config("index", shape=long).block_rows == 8  # an override beats the data
      assert tuning.config("index", block_rows=64).block_rows == 64  # explicit wins
    assert tuning.config("sparse") == tuning.DEFAULTS["sparse"]  # not in the data
    with pytest.raises(dataclasses.FrozenInstanceError):
      tuning.config("index").block_rows = 1
    with pytest.raises(ValueError, match="unknown tuning section"):
      tuning.save("cpu", {"indx": {}}, data_dir=str(tmp_path))
    with pytest.raises(TypeError):  # a misspelt parameter never reaches the data
      tuning.save("cpu", {"index": {"block_row": 8}}, data_dir=str(tmp_path))
    with tuning.override("index", block_row=8), pytest.raises(ValueError, match="block_row"):
      tuning.config("index")
  finally:
    tuning._card_table.cache_clear()


def test_index_decode_default_spreads_over_the_cards_sms():
  """Without tuned data the decode index grid aims at one program per SM of the card."""
  from msa_jax.ops.index_topk import config
  gpu = types.SimpleNamespace(platform="gpu", core_count=78)
  assert config.heuristic("index_decode", gpu).min_programs == 78
  assert config.heuristic("index", gpu) == config.DEFAULTS["index"]
  cpu = types.SimpleNamespace(platform="cpu")
  assert config.heuristic("index_decode", cpu) == config.DEFAULTS["index_decode"]
