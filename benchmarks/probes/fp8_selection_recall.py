"""How much of the bf16 selection an FP8 index branch keeps (issue: an FP8 indexer).

Quantizes ``q_idx`` and ``k_idx`` to float8_e4m3fn with one scale per token (per index head
for queries: ``max |x| / 448``), scores with the products accumulated in float32 (what an FP8
tensor-core dot with float32 accumulation computes, up to summation order) and compares the
top-k blocks with those of the bf16 inputs: recall = the share of the bf16 selection's blocks
that the FP8 selection also keeps, over every (query, group). Runs the reference on a CPU or
GPU; random and structured index inputs (``msa_jax.workloads``)::

    PYTHONPATH=$PWD python3 benchmarks/probes/fp8_selection_recall.py --length 16384
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from models.cli import benchmark as bench
from msa_jax import reference

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_round_trip(x):
  """``x`` through float8_e4m3fn with one scale per row of its last axis, back to float32."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / FP8_MAX
  scale = jnp.where(scale == 0, 1.0, scale)
  return (x / scale).astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale


def recall(want, got, num_blocks):
  """Share of the valid blocks of ``want [..., k]`` that ``got`` also holds."""
  want, got = np.asarray(want), np.asarray(got)
  valid = (want >= 0) & (want < num_blocks)
  hit = (want[..., :, None] == got[..., None, :]).any(-1) & valid
  return hit.sum() / max(valid.sum(), 1)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--length", type=int, default=16384)
  parser.add_argument("--queries", type=int, default=2048, help="the last queries scored")
  args = parser.parse_args(argv)
  w = bench.M3
  n, t = args.length, args.queries
  pos = (n - t + jnp.arange(t, dtype=jnp.int32))[None]
  kvl = jnp.array([n], jnp.int32)
  select = jax.jit(lambda qi, ki: reference.index_topk(
      qi, ki, pos, kvl, block_size=w.block_size, topk=w.topk))

  @jax.jit
  def rescored(qi8, ki8, qi, ki):
    """Top-k of the bf16 scores among the FP8 scores' top 2k blocks."""
    fp8 = reference.block_scores(qi8, ki8, pos, kvl, block_size=w.block_size)
    exact = reference.block_scores(qi, ki, pos, kvl, block_size=w.block_size)
    cut = jax.lax.top_k(fp8, 2 * w.topk)[0][..., -1:]
    own = reference.own_block(pos, kvl, w.block_size)
    return reference.select_blocks(jnp.where(fp8 >= cut, exact, -jnp.inf), own, w.topk)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, context {n}, last {t} queries, "
        f"Bk {w.block_size}, k {w.topk}, Di {w.index_dim}")
  print("| selection | quantized | FP8 recall of the bf16 blocks | queries with all 16 kept |")
  print("|---|---|---|---|")
  for selection in bench.SELECTIONS:
    q_idx, k_idx = bench.index_inputs(selection, jax.random.PRNGKey(7), 1, n, t, w)
    want = select(q_idx.astype(jnp.float32), k_idx.astype(jnp.float32))
    nb = n // w.block_size
    for name, qi, ki in (("q and k", fp8_round_trip(q_idx), fp8_round_trip(k_idx)),
                         ("k only", q_idx.astype(jnp.float32), fp8_round_trip(k_idx))):
      got = select(qi, ki)
      same = np.mean([set(a) == set(b) for a, b in zip(np.asarray(want).reshape(-1, w.topk),
                                                        np.asarray(got).reshape(-1, w.topk))])
      print(f"| {selection} | {name} | {recall(want, got, nb):.4f} | {same:.3f} |", flush=True)
    got = rescored(fp8_round_trip(q_idx), fp8_round_trip(k_idx), q_idx.astype(jnp.float32),
                   k_idx.astype(jnp.float32))
    same = np.mean([set(a) == set(b) for a, b in zip(np.asarray(want).reshape(-1, w.topk),
                                                      np.asarray(got).reshape(-1, w.topk))])
    print(f"| {selection} | q and k, bf16 re-score of the FP8 top {2 * w.topk} | "
          f"{recall(want, got, nb):.4f} | {same:.3f} |", flush=True)


if __name__ == "__main__":
  sys.exit(main())
