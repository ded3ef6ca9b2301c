"""Profile one MSA decode step and one prefill chunk: time per GPU kernel, from a jax trace.

Runs ``models/cli/profile_step.py`` from a checkout, installed or not; installed, the same
command is ``msa-profile-step`` or ``python -m models.cli.profile_step``. ``--help`` says the
rest.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.cli.profile_step import run  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  run()
