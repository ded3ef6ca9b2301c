"""Model-level benchmark: prefill and decode of a MiniMax-M3-family model as users run it.

Runs ``models/cli/benchmark_model.py`` from a checkout, installed or not; installed, the same
command is ``msa-benchmark-model`` or ``python -m models.cli.benchmark_model``. ``--help`` says
the rest.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.cli.benchmark_model import run  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  run()
