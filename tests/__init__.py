"""The test suite: its folders mirror the packages (``ops/<op>/``, ``models/``, ``scripts/``)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
