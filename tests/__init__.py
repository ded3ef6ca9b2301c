"""The test suite: its folders mirror the packages (``ops/<op>/``, ``models/``, ``scripts/``)."""

import contextlib
import io
import os
import sys
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout


class Result(NamedTuple):
  """What the shell would see of a command: exit status and output."""
  returncode: int
  stdout: str
  stderr: str


def call_main(main, args, stdin: str = "") -> Result:
  """A command's ``main(args)`` (``models.cli.<name>.main``) in this process, with its exit
  status and output as the shell would see them: ``SystemExit("message")`` is status 1 with
  the message on stderr. The float32 matmul precision a command may set is put back."""
  import jax
  out, err = io.StringIO(), io.StringIO()
  precision = jax.config.jax_default_matmul_precision
  code, saved_stdin, sys.stdin = 0, sys.stdin, io.StringIO(stdin)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        code = main(args) or 0
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
          print(e.code, file=sys.stderr)
  finally:
    sys.stdin = saved_stdin
    jax.config.update("jax_default_matmul_precision", precision)
  return Result(code, out.getvalue(), err.getvalue())
