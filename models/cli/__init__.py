"""The command line: one module per command, and what the commands share.

Each command is ``models/cli/<name>.py`` with ``main(argv=None)`` (what tests call) and
``run()`` (the console command). Installed, they are ``msa-generate``, ``msa-finetune``,
``msa-evaluate``, ``msa-convert``, ``msa-benchmark`` and ``msa-benchmark-model``; all of them
also run as ``python -m models.cli.<name>`` and, from a checkout, as ``python
scripts/<name>.py``. Shared here: one ``--help`` style, the compilation cache and the commit a
measurement was taken at.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
  """The module docstring as written, and every option's default in ``--help`` (also for
  options without a help text; not where the help already names its default, nor for
  defaults of None/False/empty, which mean "not given")."""

  @staticmethod
  def _shows_default(action) -> bool:
    default = action.default
    return (bool(action.option_strings) and default is not argparse.SUPPRESS
            and default is not None and default is not False and default not in ([], ""))

  def _format_action(self, action):
    if action.help is None and self._shows_default(action):
      action = copy.copy(action)
      action.help = "default: %(default)s"
    return super()._format_action(action)

  def _get_help_string(self, action):
    text = action.help or ""
    if "default" in text or not self._shows_default(action):
      return text
    return super()._get_help_string(action)


def console_command(main, *, compilation_cache: bool = False):
  """``run()`` of a command module: ``main()`` with its exit status for the shell (the
  console script ``msa-<name>``, ``python -m models.cli.<name>``, ``scripts/<name>.py``);
  ``compilation_cache``: reruns skip most compilation."""
  def run():
    if compilation_cache:
      enable_compilation_cache()
    sys.exit(main())
  return run


def enable_compilation_cache(folder: str | None = None):
  """Keep compiled programs on disk between runs (JAX's persistent compilation cache): a
  script's second run skips most of its compilation. ``folder`` defaults to
  ``$JAX_COMPILATION_CACHE_DIR``, else ``msa-jax/jax`` in the user's cache folder
  (``$XDG_CACHE_HOME`` or ``~/.cache``). Before JAX is imported this only sets the
  environment JAX reads at import, so ``--help`` stays instant."""
  if folder is None:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(root, "msa-jax", "jax")
  settings = {"jax_compilation_cache_dir": folder,
              "jax_persistent_cache_min_compile_time_secs": 0.5}
  if "jax" in sys.modules:
    for name, value in settings.items():
      sys.modules["jax"].config.update(name, value)
  else:
    for name, value in settings.items():
      os.environ[name.upper()] = str(value)


def add_data_arguments(parser: argparse.ArgumentParser):
  """The data flags of ``evaluate`` and ``finetune`` (``make_source`` reads them)."""
  g = parser.add_argument_group("data")
  g.add_argument("--task", choices=["retrieval", "text"], default="retrieval",
                 help="synthetic long-context key->value retrieval, or tokenised text "
                      "(default: retrieval)")
  g.add_argument("--seq-len", type=int, default=256,
                 help="tokens per example fed to the model (default 256)")
  g.add_argument("--num-pairs", type=int, default=8,
                 help="retrieval: key->value pairs hidden per example (default 8)")
  g.add_argument("--num-queries", type=int, default=1,
                 help="retrieval: queried keys at the end of each example, each a scored "
                      "target (default 1)")
  g.add_argument("--repeats", type=int, default=1,
                 help="retrieval: store each pair this many times; values of the later "
                      "occurrences are scored targets too (a denser training signal; "
                      "default 1)")
  g.add_argument("--fused-pairs", action="store_true",
                 help="retrieval: store each pair as one token naming its key and value "
                      "(16 values): the lookup is one attention step, no induction circuit "
                      "to form first (models/data.py)")
  g.add_argument("--text-files", nargs="+", default=[],
                 help="text: .txt (one document per file) and/or .jsonl files")
  g.add_argument("--text-field", default="text", help="text: the .jsonl field (default text)")
  g.add_argument("--tokenizer", default=None,
                 help="tokenizer.json (or a folder with one); default: the checkpoint's, "
                      "else UTF-8 bytes")
  g.add_argument("--eos-id", type=int, default=None,
                 help="text: a token id appended after every document")
  g.add_argument("--eval-fraction", type=float, default=0.05,
                 help="text: share of the packed windows held out as the eval split "
                      "(default 0.05)")
  g.add_argument("--data-seed", type=int, default=0,
                 help="seed of the data (retrieval examples, text shuffling; default 0)")


def make_source(args, vocab_size: int, tokenizer_dirs=()):
  """The data source the ``add_data_arguments`` flags describe (``models.evaluation.
  data_source``); SystemExit with the reason on bad settings or files."""
  from models import evaluation  # pylint: disable=g-import-not-at-top
  if args.task == "text" and not args.text_files:
    raise SystemExit("--task text needs --text-files")
  try:
    return evaluation.data_source(
        vocab_size, task=args.task, seq_len=args.seq_len, num_pairs=args.num_pairs,
        num_queries=args.num_queries, repeats=args.repeats, fused_pairs=args.fused_pairs,
        text_files=args.text_files, text_field=args.text_field, tokenizer=args.tokenizer,
        eos_id=args.eos_id, eval_fraction=args.eval_fraction, data_seed=args.data_seed,
        tokenizer_dirs=tokenizer_dirs)
  except (ValueError, OSError) as e:
    raise SystemExit(f"{args.task} data: {e}")


def results_dir(*parts: str) -> str:
  """``benchmarks/results/<card>/<parts>``: where a benchmark's results go by default
  (``<card>`` as in ``msa_jax.tuning.card_dir``: ``nvidia_h200``, ``cpu``)."""
  from msa_jax import tuning
  return os.path.join("benchmarks", "results", tuning.card_dir(tuning.device_kind()), *parts)


def commit() -> str:
  """The commit results are recorded at: ``$MSA_COMMIT`` if set (a copied tree whose .git is
  stale), else ``git rev-parse --short HEAD`` of this checkout, else ``"unknown"``."""
  if os.environ.get("MSA_COMMIT"):
    return os.environ["MSA_COMMIT"]
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.abspath(__file__)), check=False)
    return out.stdout.strip() or "unknown"
  except OSError:
    return "unknown"
