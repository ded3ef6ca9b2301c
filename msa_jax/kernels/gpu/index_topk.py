"""Index scoring with the block max-pool fused, for GPUs (Pallas, Triton lowering).

Grid ``(B, G, query tiles, key tiles)``; a program scores ``block_q`` index queries of one
group against ``blocks_per_tile`` KV blocks: per block one ``[block_q, Di] x [Di, Bk]`` GEMM,
the causal/length mask applied token by token, then the max over the block's keys. Only the
block maxima ``[block_q, blocks_per_tile]`` leave the program: the token scores never reach
HBM. No exponentials anywhere (exp-free selection, spec §3.5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr


def _kernel(pos_ref, kv_len_ref, q_ref, k_ref, out_ref, *, block_size, blocks_per_tile):
  b = pl.program_id(0)
  tile = pl.program_id(3)
  q = q_ref[...]  # [block_q, Di]
  pos = pos_ref[...]  # [block_q]
  kv_len = kv_len_ref[b]
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  col = lax.broadcasted_iota(jnp.int32, (1, blocks_per_tile), 1)
  scores = jnp.full((q.shape[0], blocks_per_tile), -jnp.inf, jnp.float32)
  for j in range(blocks_per_tile):
    k = k_ref[pl.ds(j * block_size, block_size), :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
    key_pos = ((tile * blocks_per_tile + j) * block_size
               + lax.broadcasted_iota(jnp.int32, (1, block_size), 1))
    visible = (key_pos <= pos[:, None]) & (key_pos < kv_len)
    block_max = jnp.max(jnp.where(visible, s, -jnp.inf), axis=1)
    scores = jnp.where(col == j, block_max[:, None], scores)
  out_ref[...] = scores


def block_scores(q_idx, k_idx, q_positions, kv_lengths, *, block_size, block_q=64,
                 blocks_per_tile=16, num_warps=4, num_stages=2, interpret=False):
  """Block-max scores ``[B,T,G,nb]`` (fp32, -inf where no key is visible)."""
  b, t, g, di = q_idx.shape
  s_len = k_idx.shape[1]
  nb = -(-s_len // block_size)
  blocks_per_tile = min(blocks_per_tile, pl.next_power_of_2(nb))
  n_tiles = -(-nb // blocks_per_tile)
  block_q = min(block_q, max(16, pl.next_power_of_2(t)))
  tp = -(-t // block_q) * block_q
  keys = n_tiles * blocks_per_tile * block_size
  k_idx = jnp.pad(k_idx, ((0, 0), (0, keys - s_len), (0, 0)))
  q_idx = jnp.pad(q_idx, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  q_positions = jnp.pad(q_positions, ((0, 0), (0, tp - t)), constant_values=-1)
  kernel = functools.partial(_kernel, block_size=block_size, blocks_per_tile=blocks_per_tile)
  tile_keys = blocks_per_tile * block_size
  scores = pl.pallas_call(
      kernel,
      grid=(b, g, tp // block_q, n_tiles),
      in_specs=[
          pl.BlockSpec((None, block_q), lambda bi, gi, qi, ki: (bi, qi)),
          pl.BlockSpec(),  # kv_lengths: the whole array, read as scalars
          pl.BlockSpec((None, block_q, None, di), lambda bi, gi, qi, ki: (bi, qi, gi, 0)),
          pl.BlockSpec((None, tile_keys, di), lambda bi, gi, qi, ki: (bi, ki, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, block_q, blocks_per_tile),
                             lambda bi, gi, qi, ki: (bi, gi, qi, ki)),
      out_shape=jax.ShapeDtypeStruct((b, g, tp, n_tiles * blocks_per_tile), jnp.float32),
      compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="msa_index_block_scores",
  )(q_positions, kv_lengths, q_idx, k_idx)
  return scores[:, :, :t, :nb].transpose(0, 2, 1, 3)
