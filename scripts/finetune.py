"""Train or fine-tune a MiniMax-M3-family model with MSA (Optax AdamW, sharded, resumable).

Runs ``models/cli/finetune.py`` from a checkout, installed or not; installed, the same command
is ``msa-finetune`` or ``python -m models.cli.finetune``. ``--help`` says the rest.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.cli.finetune import run  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  run()
