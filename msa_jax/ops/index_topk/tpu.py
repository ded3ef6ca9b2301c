"""Index scoring with the block max-pool fused, for TPUs (Pallas, Mosaic TPU).

Grid ``(B, G, query tiles, key tiles)``, all parallel; ``kv_lengths`` arrives by scalar
prefetch. Scores are computed transposed, ``[Bk, block_q] = k_blk @ q^T``, so queries sit in
lanes: the causal mask compares a sublane iota of key positions with a lane row of query
positions, the block max is a sublane reduction, and a tile of ``blocks_per_tile`` block
maxima ``[blocks_per_tile, block_q]`` is the only output. Token scores never reach HBM; no
exponentials (exp-free selection, docs/msa.md §3.5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _kernel(kv_len_ref, pos_ref, q_ref, k_ref, out_ref, *, block_size, blocks_per_tile):
  b = pl.program_id(0)
  tile = pl.program_id(3)
  q = q_ref[...]  # [block_q, Di]
  pos = pos_ref[...]  # [1, block_q]
  kv_len = kv_len_ref[b]
  row = lax.broadcasted_iota(jnp.int32, (blocks_per_tile, 1), 0)
  scores = jnp.full((blocks_per_tile, q.shape[0]), -jnp.inf, jnp.float32)
  for j in range(blocks_per_tile):
    k = k_ref[pl.ds(j * block_size, block_size), :]
    s = lax.dot_general(k, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    key_pos = ((tile * blocks_per_tile + j) * block_size
               + lax.broadcasted_iota(jnp.int32, (block_size, 1), 0))
    visible = (key_pos <= pos) & (key_pos < kv_len)
    block_max = jnp.max(jnp.where(visible, s, -jnp.inf), axis=0, keepdims=True)
    scores = jnp.where(row == j, block_max, scores)
  out_ref[...] = scores


def block_scores(q_idx, k_idx, q_positions, kv_lengths, *, block_size, block_q=256,
                 blocks_per_tile=16, interpret=False):
  """Block-max scores ``[B,T,G,nb]`` (fp32, -inf where no key is visible)."""
  b, t, g, di = q_idx.shape
  s_len = k_idx.shape[1]
  nb = -(-s_len // block_size)
  blocks_per_tile = nb if nb <= blocks_per_tile else blocks_per_tile
  n_tiles = -(-nb // blocks_per_tile)
  block_q = t if t <= block_q else block_q
  tp = -(-t // block_q) * block_q
  keys = n_tiles * blocks_per_tile * block_size
  k_idx = jnp.pad(k_idx, ((0, 0), (0, keys - s_len), (0, 0)))
  q_idx = jnp.pad(q_idx, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  q_positions = jnp.pad(q_positions, ((0, 0), (0, tp - t)), constant_values=-1)[:, None, :]
  kernel = functools.partial(_kernel, block_size=block_size, blocks_per_tile=blocks_per_tile)
  tile_keys = blocks_per_tile * block_size
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, g, tp // block_q, n_tiles),
      in_specs=[
          pl.BlockSpec((None, 1, block_q), lambda bi, gi, qi, ki, _: (bi, 0, qi)),
          pl.BlockSpec((None, None, block_q, di), lambda bi, gi, qi, ki, _: (bi, gi, qi, 0)),
          pl.BlockSpec((None, tile_keys, di), lambda bi, gi, qi, ki, _: (bi, ki, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, blocks_per_tile, block_q),
                             lambda bi, gi, qi, ki, _: (bi, gi, ki, qi)),
  )
  scores = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, g, n_tiles * blocks_per_tile, tp), jnp.float32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "parallel")),
      interpret=interpret,
      name="msa_index_block_scores",
  )(kv_lengths, q_positions, q_idx, k_idx)
  return scores[:, :, :nb, :t].transpose(0, 3, 1, 2)
