"""models.cli: the scripts' shared --help style."""

import argparse

from models import cli


def test_help_shows_every_meaningful_default_once():
  parser = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
  parser.add_argument("--steps", type=int, default=16)  # no help text
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  parser.add_argument("--chunk", type=int, default=8192, help="chunk size (default 8192)")
  parser.add_argument("--out", default=None, help="where to write")
  parser.add_argument("--quiet", action="store_true", help="say less")
  text = parser.format_help()
  assert "default: 16" in text
  assert "random seed (default: 0)" in text  # 0 is a value, not "not given"
  assert text.count("8192") == 1  # the help names its default: nothing appended
  assert "where to write\n" in text and "None" not in text
  assert "say less\n" in text and "False" not in text
