"""What only the TPU backward has: a run under the Mosaic-TPU simulator with the race
detector on and uninitialised memory NaN-filled, and the tiling restrictions of compiled
TPU kernels (the tests shared with the GPU kernels: test_backward.py)."""

import functools

import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from msa_jax.ops.sparse_attention import tpu_bwd as bwd
from tests import backward_checks as B
from tests import cases as C


def test_under_tpu_interpreter_race_free(monkeypatch):
  """Mosaic-TPU simulation of both kernels: DMA/semaphore use checked, races detected,
  uninitialised memory (scratch, outputs) NaN-filled, lists split into several items."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  states = []  # the simulator makes a fresh race state per kernel; keep each one

  class Recording(ipc.RaceDetectionState):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      states.append(self)

  monkeypatch.setattr(ipc, "RaceDetectionState", Recording)
  case = C.CASES["decode8"]
  x = C.make_inputs(case, jnp.float32, seed=26)
  ids = C.random_selection(case, x, seed=26, holes=True)
  params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
  B.check(B.tpu_kernel_grads, x, ids, case.block_size, jnp.float32, seed=26,
          queries_per_item=2, interpret=params)
  assert ipc.races is not None and not ipc.races.races_found
  assert len(states) >= 2  # the dQ and the dK/dV kernel
  assert not any(s.races_found for s in states)


def test_tpu_tiling_restrictions_raise():
  """Compiling for a TPU (interpret=False): shapes Mosaic cannot tile raise ValueError before
  any kernel is traced."""
  case = C.CASES["decode8"]  # Hq/G = 8
  x = C.make_inputs(case, jnp.float32, seed=27)
  ids = C.random_selection(case, x, seed=27)
  b, t, hq, d = x["q"].shape
  out = jnp.zeros_like(x["q"])
  lse = jnp.zeros((b, t, hq), jnp.float32)
  call = functools.partial(bwd.sparse_attention_bwd, x["q"], x["k"], x["v"], ids,
                           x["q_positions"], x["kv_lengths"], out, lse, out, scale=0.1)
  with pytest.raises(ValueError, match="block_size"):
    call(block_size=12)
  # bf16 packs 16 rows per sublane tile: 8 heads cannot be stacked into one [rows, D] tile.
  cast = lambda a: a.astype(jnp.bfloat16)
  with pytest.raises(ValueError, match="queries_per_item"):
    bwd.sparse_attention_bwd(cast(x["q"]), cast(x["k"]), cast(x["v"]), ids, x["q_positions"],
                             x["kv_lengths"], cast(out), lse, cast(out), block_size=16,
                             scale=0.1, queries_per_item=4)
  with pytest.raises(ValueError, match="block_indices"):
    bwd.sparse_attention_bwd(x["q"], x["k"], x["v"], ids[:, :1], x["q_positions"],
                             x["kv_lengths"], out, lse, out, block_size=16, scale=0.1,
                             interpret=True)
