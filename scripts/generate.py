"""Generate text with a MiniMax-M3-family model from a Hugging Face checkpoint folder.

Runs ``models/cli/generate.py`` from a checkout, installed or not; installed, the same command
is ``msa-generate`` or ``python -m models.cli.generate``. ``--help`` says the rest.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.cli.generate import run  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  run()
