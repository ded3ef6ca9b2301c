"""models.cli: the commands' shared --help style, the console commands, the installed wheel."""

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from models import cli
from tests import ROOT


def test_help_shows_every_meaningful_default_once():
  parser = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
  parser.add_argument("--steps", type=int, default=16)  # no help text
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  parser.add_argument("--chunk", type=int, default=8192, help="chunk size (default 8192)")
  parser.add_argument("--out", default=None, help="where to write")
  parser.add_argument("--quiet", action="store_true", help="say less")
  text = parser.format_help()
  assert "default: 16" in text
  assert "random seed (default: 0)" in text  # 0 is a value, not "not given"
  assert text.count("8192") == 1  # the help names its default: nothing appended
  assert "where to write\n" in text and "None" not in text
  assert "say less\n" in text and "False" not in text


COMMANDS = ["benchmark", "benchmark_model", "convert", "evaluate", "finetune", "generate",
            "gpu_check", "make_tiny_checkpoint", "profile_step"]


class _Parsed(Exception):
  pass


def _parsers(name, monkeypatch):
  """The argument parsers ``models.cli.<name>.main`` builds (sub-commands' too)."""
  module = importlib.import_module(f"models.cli.{name}")
  seen = []

  def capture(self, *args, **kwargs):
    seen.append(self)
    raise _Parsed

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
  with pytest.raises(_Parsed):
    module.main([])
  parsers = list(seen)
  for parser in seen:
    for action in parser._actions:  # pylint: disable=protected-access
      if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
        parsers += list(action.choices.values())
  return parsers


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_documents_every_option_and_default(name, monkeypatch):
  """One --help style: each command's options have a help text, and every meaningful
  default is shown."""
  for parser in _parsers(name, monkeypatch):
    assert parser.formatter_class is cli.HelpFormatter, (name, parser.prog)
    text = " ".join(parser.format_help().split())  # unwrapped
    for action in parser._actions:  # pylint: disable=protected-access
      if not action.option_strings or action.help == argparse.SUPPRESS:
        continue
      assert action.help, (name, action.option_strings)
      # A default the help does not name itself is appended by the formatter.
      meaningful = cli.HelpFormatter._shows_default(action)  # pylint: disable=protected-access
      if meaningful and "default" not in action.help:
        shown = " ".join(str(action.default).split())
        assert f"(default: {shown})" in text, (name, action.dest)


def test_console_commands_exist():
  """Each console command of pyproject.toml names a ``run`` that exists."""
  root = ROOT
  with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert {"msa-generate", "msa-finetune", "msa-evaluate", "msa-convert",
          "msa-benchmark"} <= set(scripts)
  for target in scripts.values():
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func)), target
    assert os.path.exists(os.path.join(root, "scripts", module.split(".")[-1] + ".py"))


def test_installed_wheel_generates(tmp_path):
  """A built wheel, installed (not editable) into a fresh folder, runs ``msa-generate`` end
  to end from outside the checkout: presets and entry points ship with it."""
  root = ROOT
  run = lambda *args, **kw: subprocess.run(args, capture_output=True, text=True, **kw)
  source = tmp_path / "source"  # a copy: building in place would leave build/ in the checkout
  source.mkdir()
  for name in ("pyproject.toml", "README.md", "msa_jax", "models"):
    copy = shutil.copytree if os.path.isdir(os.path.join(root, name)) else shutil.copy
    copy(os.path.join(root, name), source / name)
  built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
              "-w", str(tmp_path / "wheel"), str(source))
  assert built.returncode == 0, built.stderr[-2000:]
  wheel, = (tmp_path / "wheel").glob("*.whl")
  target = tmp_path / "site"
  installed = run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                  str(target), str(wheel))
  assert installed.returncode == 0, installed.stderr[-2000:]
  env = dict(os.environ, PYTHONPATH=str(target), XDG_CACHE_HOME=str(tmp_path / "cache"),
             JAX_PLATFORMS="cpu")
  where = run(sys.executable, "-c", "import models; print(models.__file__)", env=env,
              cwd=tmp_path)
  assert where.stdout.startswith(str(target)), where  # the wheel, not the checkout
  out = run(sys.executable, str(target / "bin" / "msa-generate"), "--prompt", "hi",
            "--max-new-tokens", "3", env=env, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "completion 0:" in out.stdout and "random weights" in out.stderr


def test_compilation_cache_before_and_after_jax_starts(tmp_path):
  """Before JAX is imported the cache is set through the environment JAX reads (so --help
  imports nothing heavy); after, through jax.config."""
  code = ("import sys; from models import cli; cli.enable_compilation_cache({folder!r}); "
          "assert ('jax' in sys.modules) == {imported}; import jax; "
          "print(jax.config.jax_compilation_cache_dir, "
          "jax.config.jax_persistent_cache_min_compile_time_secs)")
  for imported in (False, True):
    folder = str(tmp_path / str(imported))
    prefix = "import jax; " if imported else ""
    out = subprocess.run([sys.executable, "-c", prefix + code.format(folder=folder,
                                                                     imported=imported)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [folder, "0.5"], out


@pytest.mark.parametrize("name", ["generate", "evaluate", "convert", "make_tiny_checkpoint"])
def test_help_does_not_import_jax(name):
  """These commands parse their arguments before JAX loads: --help answers at once."""
  code = (f"import sys; from models.cli import {name} as m\n"
          "sys.argv = ['x', '--help']\ntry:\n  m.run()\n"
          "except SystemExit as e:\n  assert e.code == 0\n"
          "assert 'jax' not in sys.modules, 'jax imported'")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
