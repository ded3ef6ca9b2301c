"""Evaluate a MiniMax-M3-family model: retrieval accuracy, perplexity and indexer recall.

Runs ``models/cli/evaluate.py`` from a checkout, installed or not; installed, the same command
is ``msa-evaluate`` or ``python -m models.cli.evaluate``. ``--help`` says the rest.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.cli.evaluate import run  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  run()
