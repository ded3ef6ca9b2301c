"""Benchmark MSA against dense attention on one accelerator (protocol: docs/benchmarks.md).

Runs ``models/cli/benchmark.py`` from a checkout, installed or not; installed, the same command
is ``msa-benchmark`` or ``python -m models.cli.benchmark``. ``--help`` says the rest.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.cli.benchmark import run  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  run()
