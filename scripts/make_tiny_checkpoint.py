"""Write a small random MiniMax-M3-family model in the exact released Hugging Face layout.

Runs ``models/cli/make_tiny_checkpoint.py`` from a checkout, installed or not; installed, the
same command is ``msa-make-tiny-checkpoint`` or ``python -m models.cli.make_tiny_checkpoint``.
``--help`` says the rest.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.cli.make_tiny_checkpoint import run  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  run()
