"""Test setup: 8 fake CPU devices for sharding tests (must precede the first jax import), exact
float32 matmuls on GPUs, and the "slow" marker on the tests listed in ``slow_tests.txt``."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if os.environ["JAX_PLATFORMS"] in ("cuda", "gpu"):
  # float32 tests check the algorithm to ~1e-5; GPUs multiply float32 in TF32 (10 mantissa
  # bits) unless asked for full precision, in XLA and in the Triton kernels alike.
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")

_SLOW_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_tests.txt")


def _slow_ids() -> set[str]:
  with open(_SLOW_LIST) as f:
    return {line.strip() for line in f if line.strip() and not line.startswith("#")}


def _whole_suite(config) -> bool:
  """Whether this run collects every test (no -k, no file or test named)."""
  here = os.path.dirname(os.path.abspath(__file__))
  return not config.option.keyword and all(
      os.path.abspath(str(a)) == here for a in config.args)


def pytest_collection_modifyitems(config, items):
  slow = _slow_ids()
  for item in items:
    if item.nodeid in slow:
      item.add_marker(pytest.mark.slow)
  stale = slow - {item.nodeid for item in items}
  if stale and _whole_suite(config):  # a renamed or removed test left its line behind
    raise pytest.UsageError("tests/slow_tests.txt names tests that do not exist (rename or "
                            "remove the lines): " + ", ".join(sorted(stale)[:10]))
