"""Convert MiniMax-M3-family checkpoints between the Hugging Face layout and Orbax.

Runs ``models/cli/convert.py`` from a checkout, installed or not; installed, the same command is
``msa-convert`` or ``python -m models.cli.convert``. ``--help`` says the rest.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.cli.convert import run  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  run()
