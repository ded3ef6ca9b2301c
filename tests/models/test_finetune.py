"""Fine-tuning: train_forward modes, gradient separation, the trainer (indexer-only, sharded),
and the finetune and evaluate commands end to end (in-process; one --help subprocess)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import data, losses, sharding, training
from models import evaluation
from models.cli import evaluate
from models.cli import finetune
from tests import ROOT

SCRIPTS = os.path.join(ROOT, "scripts")

# Two layers (full attention, then MSA), dense MLPs: Bk = 16, k = 2, so at 128 tokens each
# query of the MSA layer attends to 2 of up to 8 blocks.
SMALL_FLAGS = ["--num-layers", "2", "--sparse-layers", "0,1", "--moe-layers", "none",
               "--hidden-size", "32", "--vocab-size", "64", "--mlp-dim", "64",
               "--block-size", "16", "--topk", "2"]
SMALL = training.override_config(models.preset("tiny"), num_layers=2, sparse_layers="0,1",
                                 moe_layers="none", hidden_size=32, vocab_size=64,
                                 dense_intermediate_size=64)
TASK = data.RetrievalTask(SMALL.vocab_size, 128, num_pairs=4, num_queries=4, seed=0)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs of the CLI compile the same step functions again: share them through JAX's
  persistent compilation cache (the in-memory cache is per jitted function object)."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  values = (str(tmp_path_factory.mktemp("jax_cache")), 0, 0)
  for n, v in zip(names, values):
    jax.config.update(n, v)
  _reset_cache()
  yield
  for n, v in old.items():
    jax.config.update(n, v)
  _reset_cache()


def _reset_cache():
  try:  # the cache decides once per process whether it is on; make it look again
    from jax._src import compilation_cache
    compilation_cache.reset_cache()
  except (ImportError, AttributeError):
    pass


def _records(folder):
  with open(os.path.join(folder, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _flat(tree):
  return {k: np.asarray(v) for k, v in tree.items()}


# ----------------------------------------------------------------------------- the model


def test_train_forward_modes_and_gradient_separation():
  model = models.MiniMaxM3(SMALL, rngs=nnx.Rngs(0))
  parts = training.ModelParts(model)
  params = parts.params()
  batch = TASK.batch(0, 2)
  tokens = jnp.asarray(batch["inputs"])

  logits, aux = jax.jit(lambda p: parts.merge(p).train_forward(tokens))(params)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model.forward(tokens)), atol=1e-5)
  dense, _ = jax.jit(lambda p: parts.merge(p).train_forward(tokens, attention="dense"))(params)
  assert float(jnp.abs(dense - logits).max()) > 1e-3  # 128 tokens > k*Bk: MSA is not dense

  def kl_grads(attention, indexer_loss):
    def kl(p):
      _, aux = parts.merge(p).train_forward(tokens, attention=attention,
                                            indexer_loss=indexer_loss)
      return jnp.sum(aux["kl"]), aux["kl"]
    return jax.jit(jax.grad(kl, has_aux=True))(params)

  for attention, support in (("msa", "selected"), ("dense", "causal"), ("dense", "selected")):
    grads, per_layer = kl_grads(attention, support)
    assert float(per_layer[0]) == 0.0 and float(per_layer[1]) > 0.0  # full layer: no KL
    for key, g in grads.items():
      size = float(jnp.abs(g).max())
      if training.is_index_param(key):
        assert size > 0.0, (attention, support, key)
      else:
        assert size == 0.0, (attention, support, key)  # KL reaches the index branch only

  def lm(p, remat):
    logits, _ = parts.merge(p).train_forward(tokens, remat=remat)
    total, n = losses.token_cross_entropy(logits, jnp.asarray(batch["targets"]))
    return total / n

  grads = jax.jit(jax.grad(lambda p: lm(p, False)))(params)
  grads_remat = jax.jit(jax.grad(lambda p: lm(p, True)))(params)
  for key, g in grads.items():
    if training.is_index_param(key):
      assert float(jnp.abs(g).max()) == 0.0, key  # LM loss never reaches the index branch
    np.testing.assert_allclose(np.asarray(grads_remat[key]), np.asarray(g), atol=1e-6)
  assert float(jnp.abs(grads["layers.1.self_attn.q_proj.kernel"]).max()) > 0.0


# ----------------------------------------------------------------------------- the trainer


def test_indexer_only_trains_only_the_index_branch():
  model = models.MiniMaxM3(SMALL, rngs=nnx.Rngs(1))
  trainer = training.Trainer(model, training.TrainConfig(total_steps=8, mode="indexer-only",
                                                         learning_rate=1e-2))
  assert all(training.is_index_param(k) for k in trainer.trainable)
  state = trainer.init_state()
  assert set(state["opt_state"][1][0].mu) == set(trainer.trainable)  # no backbone moments
  before = _flat(state["params"])
  batch = TASK.batch(0, 4)
  kls = []
  for _ in range(8):  # one batch again and again: the KL must fall
    state, met = trainer.step(state, batch)
    kls.append(float(met["kl"]))
    assert float(met["grad_norm"]) == pytest.approx(float(met["grad_norm_index"]))
  after = _flat(state["params"])
  assert int(state["step"]) == 8
  for key in before:
    if training.is_index_param(key):
      if key.endswith("proj.kernel"):
        assert not np.array_equal(before[key], after[key]), key
    else:
      np.testing.assert_array_equal(before[key], after[key], err_msg=key)  # bit-identical
  assert kls[-1] < 0.8 * kls[0], kls


def test_sharded_train_step_matches_unsharded():
  config = training.TrainConfig(total_steps=3, learning_rate=3e-3)
  batches = [TASK.batch(8 * i, 8) for i in range(3)]

  def run(mesh):
    trainer = training.Trainer(models.MiniMaxM3(SMALL, rngs=nnx.Rngs(2)), config, mesh)
    state = trainer.init_state()
    losses = []
    for batch in batches:
      state, met = trainer.step(state, batch)
      losses.append((float(met["loss"]), float(met["kl"]), float(met["grad_norm"])))
    return trainer, state, losses

  _, want_state, want = run(None)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  trainer, state, got = run(mesh)
  key = "layers.1.self_attn.q_proj.kernel"
  assert state["params"][key].sharding.spec[0] == "fsdp"  # really sharded, with its moments
  assert state["opt_state"][1][0].mu[key].sharding.spec[0] == "fsdp"
  assert trainer.batch_sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  for k, v in _flat(want_state["params"]).items():
    np.testing.assert_allclose(np.asarray(state["params"][k]), v, atol=2e-5, err_msg=k)


# ----------------------------------------------------------------------------- the scripts


def test_help():
  out = subprocess.run([sys.executable, os.path.join(SCRIPTS, "finetune.py"), "--help"],
                       capture_output=True, text=True, check=True).stdout
  for flag in ("--mode", "--attention", "--dense-warmup-steps", "--init-from", "--resume",
               "--mesh", "--param-dtype", "--save-every", "--keep", "--task", "--text-files",
               "--block-size", "--topk", "--kl-weight", "--clip-norm", "--time-limit"):
    assert flag in out, flag


def test_retrieval_run_end_to_end_and_evaluate(tmp_path, capsys):
  run = str(tmp_path / "run")
  data_flags = ["--seq-len", "128", "--num-pairs", "4", "--num-queries", "4"]
  assert finetune.main(SMALL_FLAGS + data_flags + [
      "--output-dir", run, "--steps", "40", "--dense-warmup-steps", "10", "--batch-size", "8",
      "--lr", "3e-3", "--lr-warmup-steps", "3", "--save-every", "20", "--keep", "1",
      "--eval-every", "40", "--eval-examples", "8", "--profile-step", "12", "--quiet"]) == 0
  # The traced step's kernel table (empty of GPU kernels on CPU) is written.
  assert open(os.path.join(run, "profile", "profile_step.md")).read().startswith(
      "## training step 12")
  records = _records(run)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, 41))
  assert {r["attention"] for r in train[:10]} == {"dense"}
  assert {r["indexer_loss"] for r in train[:10]} == {"causal"}
  assert {(r["attention"], r["indexer_loss"]) for r in train[10:]} == {("msa", "selected")}
  for key in ("loss", "lm_loss", "kl", "grad_norm", "tokens_per_s", "lr"):
    assert all(np.isfinite(r[key]) for r in train), key
  lm = [r["lm_loss"] for r in train]
  # From ~ln(64) towards ln(15) (the answer is one of 15 value tokens) at least.
  assert np.mean(lm[-8:]) < np.mean(lm[:5]) - 0.5, lm
  # The paper's health check: KL falls in the warm-up and stays low after the switch.
  kl = [r["kl"] for r in train]
  assert kl[9] < 0.7 * kl[0] and np.mean(kl[-10:]) < 0.5 * kl[0], kl
  assert train[0]["lr"] == 0.0 and max(r["lr"] for r in train) == pytest.approx(3e-3)
  (ev,) = [r for r in records if "eval" in r]
  assert ev["step"] == 40 and 0.0 <= ev["eval"]["accuracy"] <= 1.0
  assert 0.0 < ev["eval"]["block_recall"] <= 1.0 and 0.0 < ev["eval"]["score_recall"] <= 1.0
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["40"]  # keep 1
  assert os.path.getsize(os.path.join(run, "curves.png")) > 10_000
  assert os.path.exists(os.path.join(run, "model", "config.json"))

  out = str(tmp_path / "eval.json")
  capsys.readouterr()
  assert evaluate.main(["--checkpoint", run, "--attention", "dense", "msa", "msa-random-indexer",
                        "--num-examples", "8", "--batch-size", "8", "--output-json", out,
                        "--quiet"] + data_flags) == 0
  assert "msa-random-indexer" in capsys.readouterr().out
  result = json.loads(open(out).read())["variants"]
  assert set(result) == {"dense", "msa", "msa-random-indexer"}
  # Same weights and held-out examples as the in-training evaluation at step 40.
  assert result["msa"]["accuracy"] == ev["eval"]["accuracy"]
  np.testing.assert_allclose(result["msa"]["loss"], ev["eval"]["loss"], rtol=1e-5)
  for name, r in result.items():
    assert r["tokens"] == 32 and 0.0 <= r["block_recall"] <= 1.0, name
    for key in ("block_recall_maxpool", "oracle_block_recall", "oracle_score_recall"):
      assert 0.0 < r[key] <= 1.0, (name, key)
    assert r["perplexity"] == pytest.approx(np.exp(r["loss"]))

  # The library call behind the command: the same numbers for the same examples.
  source_fn = lambda vocab: evaluation.data_source(vocab, seq_len=128, num_pairs=4,
                                                   num_queries=4)
  lib = evaluation.evaluate_checkpoint(run, source_fn, variants=["msa"], num_examples=8,
                                       batch_size=8, progress=False)
  assert lib["variants"]["msa"]["accuracy"] == result["msa"]["accuracy"]
  np.testing.assert_allclose(lib["variants"]["msa"]["loss"], result["msa"]["loss"], rtol=1e-6)
  with pytest.raises(ValueError, match="unknown variants"):
    evaluation.evaluate_checkpoint(run, source_fn, variants=["sparse"])
  with pytest.raises(ValueError, match="text files"):
    evaluation.data_source(64, task="text")


class Killed(Exception):
  pass


def test_killed_and_resumed_run_is_exact(tmp_path, capsys):
  common = SMALL_FLAGS + ["--seq-len", "128", "--num-pairs", "4", "--num-queries", "2",
                          "--steps", "8", "--dense-warmup-steps", "2", "--batch-size", "4",
                          "--lr", "3e-3", "--save-every", "3", "--param-dtype", "bfloat16",
                          "--mesh", "data=2,fsdp=2", "--quiet"]
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  assert finetune.main(common + ["--output-dir", a]) == 0

  def kill(step, record):
    if step == 5:
      raise Killed  # after step 5; the last checkpoint is step 3

  with pytest.raises(Killed):
    finetune.main(common + ["--output-dir", b], on_step=kill)
  assert sorted(os.listdir(os.path.join(b, "checkpoints"))) == ["3"]
  with pytest.raises(SystemExit, match="--resume"):
    finetune.main(common + ["--output-dir", b])  # would overwrite the run
  with pytest.raises(SystemExit, match="data settings"):
    finetune.main(common + ["--output-dir", b, "--resume", "--data-seed", "1"])
  capsys.readouterr()
  assert finetune.main(common + ["--output-dir", b, "--resume"]) == 0
  assert "resumed from step 3" in capsys.readouterr().out

  want, got = _records(a), _records(b)
  assert [r["step"] for r in got] == list(range(1, 9))  # steps 4-5 rewritten, not duplicated
  for r, s in zip(want, got):
    for key in ("loss", "lm_loss", "kl", "grad_norm", "lr"):
      assert r[key] == s[key], (r["step"], key)  # bit-exact, not just close
  _, params_a = training.load_params(a)
  _, params_b = training.load_params(b)
  assert params_a["embed_tokens"].dtype == jnp.bfloat16
  for key, value in params_a.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(params_b[key]), err_msg=key)


def test_resume_survives_a_torn_log_and_a_damaged_newest_checkpoint(tmp_path, capsys):
  """A kill can tear the last line of metrics.jsonl and leave the newest checkpoint
  truncated: --resume skips the torn line, sets the damaged step aside (named) and resumes
  from the newest intact one, ending where an uninterrupted run ends."""
  common = SMALL_FLAGS + ["--seq-len", "128", "--num-pairs", "4", "--num-queries", "2",
                          "--steps", "8", "--dense-warmup-steps", "2", "--batch-size", "4",
                          "--lr", "3e-3", "--save-every", "3", "--mesh", "data=1",
                          "--quiet"]
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  assert finetune.main(common + ["--output-dir", a]) == 0

  def kill(step, record):
    if step == 7:
      raise Killed

  with pytest.raises(Killed):
    finetune.main(common + ["--output-dir", b], on_step=kill)
  ckpt_dir = os.path.join(b, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["3", "6"]
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ckpt_dir, "6")) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(8)
  with open(os.path.join(b, "metrics.jsonl"), "a") as f:
    f.write('{"step": 8, "loss": 1.')  # a torn line
  capsys.readouterr()
  assert finetune.main(common + ["--output-dir", b, "--resume"]) == 0
  out = capsys.readouterr()
  assert "checkpoint step 6 cannot be restored" in out.err and "6.broken" in out.err
  assert "incomplete" in out.err and "resumed from step 3" in out.out
  want, got = _records(a), _records(b)
  assert [r["step"] for r in got] == list(range(1, 9))
  for r, s in zip(want, got):
    assert r["loss"] == s["loss"], r["step"]


def test_init_from_dense_model_adds_index_projections(tmp_path, capsys):
  from models import checkpoint
  dense_cfg = SMALL.replace(sparse_layers=(False, False))
  dense = models.MiniMaxM3(dense_cfg, rngs=nnx.Rngs(3))
  checkpoint.save_orbax(dense, str(tmp_path / "dense"))
  run = str(tmp_path / "conv")
  assert finetune.main(["--init-from", str(tmp_path / "dense"), "--sparse-layers", "all",
                        "--topk", "4", "--output-dir", run, "--steps", "0",
                        "--seq-len", "128", "--mesh", "data=1", "--quiet"]) == 0
  assert "freshly initialised" in capsys.readouterr().out
  config, params = training.load_params(run)
  assert config.sparse_layers == (True, True) and config.index_topk_blocks == 4
  source = training.ModelParts(dense).params(dense)
  for key, value in params.items():
    if training.is_index_param(key):
      assert key not in source
    else:
      np.testing.assert_array_equal(np.asarray(value), np.asarray(source[key]), err_msg=key)
  assert any(training.is_index_param(k) for k in params)
