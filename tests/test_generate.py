"""scripts/generate.py end to end (subprocess), greedy tokens checked against the model."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from models import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "generate.py")
LONG = ",".join(str(i % 200 + 3) for i in range(45))  # past k*Bk = 32: selection active


def _run(args, devices=1):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return checkpoint.write_random(str(tmp_path_factory.mktemp("gen") / "tiny"), dtype="float32")


def test_help():
  out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                       check=True).stdout
  for flag in ("--checkpoint", "--prompt-ids", "--mesh", "--output-json", "--top-p"):
    assert flag in out


def test_default_tiny_end_to_end_greedy_matches_model(tmp_path):
  out = tmp_path / "out.json"
  proc = _run(["--prompt-ids", "5,17,42", "--prompt-ids", LONG, "--max-new-tokens", "4",
               "--output-json", str(out)])
  assert "tok/s" in proc.stdout.splitlines()[-1]
  result = json.loads(out.read_text())
  assert [len(g) for g in result["generated_ids"]] == [4, 4]
  model = checkpoint.load_hf(result["checkpoint"], progress=False)
  for prompt, gen in zip(result["prompt_ids"], result["generated_ids"]):
    seq = jnp.asarray([prompt + gen])
    logits = np.asarray(model.forward(seq))[0]
    want = logits[len(prompt) - 1:-1].argmax(-1)
    assert want.tolist() == gen


def test_sharded_same_tokens_as_unsharded(ckpt, tmp_path):
  args = ["--checkpoint", ckpt, "--prompt-ids", LONG, "--prompt-ids", "9,8,7",
          "--max-new-tokens", "3", "--quiet"]
  _run(args + ["--mesh", "tensor=1", "--output-json", str(tmp_path / "a.json")])
  _run(args + ["--mesh", "data=2,tensor=2,expert=2", "--output-json", str(tmp_path / "b.json")],
       devices=8)
  a = json.loads((tmp_path / "a.json").read_text())
  b = json.loads((tmp_path / "b.json").read_text())
  assert a["generated_ids"] == b["generated_ids"]
  assert b["mesh"] == {"data": 2, "tensor": 2, "expert": 2}


def test_bad_prompt_ids(ckpt):
  proc = subprocess.run([sys.executable, SCRIPT, "--checkpoint", ckpt, "--prompt-ids", "1,x"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "comma-separated integers" in proc.stderr
