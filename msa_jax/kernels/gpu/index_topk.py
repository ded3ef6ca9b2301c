"""Index scoring with the block max-pool fused, for GPUs (Pallas, Triton lowering).

All G index heads share one index key head, so a program scores a tile of ``block_rows``
(query, group) rows against ``blocks_per_tile`` KV blocks: each key tile is read once for
every group. Per block: one ``[block_rows, Di] x [Di, Bk]`` GEMM, the causal/length mask
applied token by token, then the max over the block's keys. Only the block maxima
``[block_rows, blocks_per_tile]`` leave the program: token scores never reach HBM. Key tiles
entirely past every row's last visible key skip the GEMMs (causal prefill: half the grid).
No exponentials anywhere (exp-free selection, spec §3.5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from msa_jax.kernels.gpu import tuning


def _kernel(pos_ref, kv_len_ref, q_ref, k_ref, out_ref, *, block_size, blocks_per_tile):
  b = pl.program_id(0)
  tile = pl.program_id(2)
  pos = pos_ref[...]  # [block_rows]
  kv_len = kv_len_ref[b]
  first_key = tile * blocks_per_tile * block_size
  out_ref[...] = jnp.full(out_ref.shape, -jnp.inf, jnp.float32)

  @pl.when(first_key <= jnp.minimum(jnp.max(pos), kv_len - 1))
  def _():
    q = q_ref[...]  # [block_rows, Di]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    col = lax.broadcasted_iota(jnp.int32, (1, blocks_per_tile), 1)
    key_iota = lax.broadcasted_iota(jnp.int32, (1, block_size), 1)

    def body(j, scores):
      k = k_ref[pl.ds(pl.multiple_of(j * block_size, block_size), block_size), :]
      s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32)
      key_pos = first_key + j * block_size + key_iota
      visible = (key_pos <= pos[:, None]) & (key_pos < kv_len)
      block_max = jnp.max(jnp.where(visible, s, -jnp.inf), axis=1)
      return jnp.where(col == j, block_max[:, None], scores)

    init = jnp.full((q.shape[0], blocks_per_tile), -jnp.inf, jnp.float32)
    out_ref[...] = lax.fori_loop(0, blocks_per_tile, body, init)


def block_scores(q_idx, k_idx, q_positions, kv_lengths, *, block_size, block_rows=None,
                 blocks_per_tile=None, num_warps=None, num_stages=None, interpret=False):
  """Block-max scores ``[B,T,G,nb]`` (fp32, -inf where no key is visible).

  Launch parameters left as None come from the per-card table (``tuning.py``).
  """
  cfg = tuning.config("index", block_rows=block_rows, blocks_per_tile=blocks_per_tile,
                      num_warps=num_warps, num_stages=num_stages)
  b, t, g, di = q_idx.shape
  s_len = k_idx.shape[1]
  nb = -(-s_len // block_size)
  blocks_per_tile = min(cfg["blocks_per_tile"], pl.next_power_of_2(nb))
  n_tiles = -(-nb // blocks_per_tile)
  rows = t * g
  block_rows = min(cfg["block_rows"], max(16, pl.next_power_of_2(rows)))
  rows_pad = -(-rows // block_rows) * block_rows
  keys = n_tiles * blocks_per_tile * block_size
  k_idx = jnp.pad(k_idx, ((0, 0), (0, keys - s_len), (0, 0)))
  q_rows = jnp.pad(q_idx.reshape(b, rows, di), ((0, 0), (0, rows_pad - rows), (0, 0)))
  row_pos = jnp.pad(jnp.repeat(q_positions, g, axis=1), ((0, 0), (0, rows_pad - rows)),
                    constant_values=-1)
  kernel = functools.partial(_kernel, block_size=block_size, blocks_per_tile=blocks_per_tile)
  scores = pl.pallas_call(
      kernel,
      grid=(b, rows_pad // block_rows, n_tiles),
      in_specs=[
          pl.BlockSpec((None, block_rows), lambda bi, ri, ki: (bi, ri)),
          pl.BlockSpec(),  # kv_lengths: the whole array, read as scalars
          pl.BlockSpec((None, block_rows, di), lambda bi, ri, ki: (bi, ri, 0)),
          pl.BlockSpec((None, blocks_per_tile * block_size, di), lambda bi, ri, ki: (bi, ki, 0)),
      ],
      out_specs=pl.BlockSpec((None, block_rows, blocks_per_tile),
                             lambda bi, ri, ki: (bi, ri, ki)),
      out_shape=jax.ShapeDtypeStruct((b, rows_pad, n_tiles * blocks_per_tile), jnp.float32),
      compiler_params=pltr.CompilerParams(num_warps=cfg["num_warps"],
                                          num_stages=cfg["num_stages"]),
      interpret=interpret,
      name="msa_index_block_scores",
  )(row_pos, kv_lengths, q_rows, k_idx)
  return scores[:, :rows, :nb].reshape(b, t, g, nb)
