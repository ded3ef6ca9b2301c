"""Run the Pallas GPU kernels uninterpreted at MiniMax-M3 shapes and check them.

Runs ``models/cli/gpu_check.py`` from a checkout, installed or not; installed, the same command
is ``msa-gpu-check`` or ``python -m models.cli.gpu_check``. ``--help`` says the rest.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.cli.gpu_check import run  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  run()
