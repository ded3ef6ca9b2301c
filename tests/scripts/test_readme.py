"""The README's Python examples run as written (in a fresh process each: one sets XLA_FLAGS
before JAX starts)."""

import os
import re
import subprocess
import sys

import pytest
from tests import ROOT



def _python_blocks():
  with open(os.path.join(ROOT, "README.md")) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_examples():
  assert len(_python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs(index, tmp_path):
  code = _python_blocks()[index].replace('"/tmp/tiny-m3"', repr(str(tmp_path / "tiny-m3")))
  checks = {  # what each example leaves behind, checked after it ran
      "msa_attention": "assert out.shape == q.shape[:3] + v.shape[-1:] and blocks.shape[-1] == 16",
      "serving.Generator": "assert tokens.shape == (2, 8) and len(jax.devices()) == 8",
  }
  code += "\n" + "\n".join(c for key, c in checks.items() if key in code) + "\nprint('ok')\n"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=900)
  assert proc.returncode == 0 and proc.stdout.endswith("ok\n"), proc.stderr[-3000:]
