"""Shared checks of the backward kernels (GPU and TPU) against the reference gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax import reference
from tests import cases as C

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}

GRAD_CASES = [
    # Padding queries (short kv_length), GQA 2, hot blocks split over several items.
    ("prefill_padding", jnp.float32),
    ("prefill_padding", jnp.bfloat16),
    # Partial last block, GQA 1.
    ("partial_block_gqa1", jnp.float32),
    # Chunked prefill: explicit offset positions and per-sequence kv_lengths, GQA 8.
    ("chunked_prefill_gqa8", jnp.float32),
    ("chunked_prefill_gqa8", jnp.bfloat16),
    # Decode, T = 1, GQA 16, a sequence with a single key.
    ("decode_gqa16", jnp.float32),
    # topk larger than the number of blocks: -1 slots.
    ("topk_exceeds_blocks", jnp.float32),
]


def normal(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "scale"))
def reference_grads(q, k, v, ids, q_positions, kv_lengths, d_out, d_lse, *, block_size, scale):
  """Gradient of the reference in float32 on the (possibly bf16-rounded) inputs."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)

  def f(q, k, v):
    return reference.sparse_attention(q, k, v, ids, q_positions, kv_lengths,
                                      block_size=block_size, scale=scale)

  _, pullback = jax.vjp(f, f32(q), f32(k), f32(v))
  return pullback((f32(d_out), f32(d_lse)))


def check(kernel_grads, x, ids, block_size, dtype, seed, d_lse=True, **params):
  """``kernel_grads(q, k, v, ids, pos, lens, d_out, d_lse, block_size=, scale=, **params)``
  against ``reference_grads`` on random cotangents: shapes, dtypes, every element written
  (interpret mode NaN-fills outputs) and the relative error. Returns (got, want)."""
  b, t, hq, d = x["q"].shape
  scale = 1.0 / np.sqrt(d)
  d_out = normal((b, t, hq, x["v"].shape[-1]), seed, dtype)
  d_lse = normal((b, t, hq), seed + 1) if d_lse else jnp.zeros((b, t, hq), jnp.float32)
  got = kernel_grads(x["q"], x["k"], x["v"], ids, x["q_positions"], x["kv_lengths"], d_out,
                     d_lse, block_size=block_size, scale=scale, **params)
  want = reference_grads(x["q"], x["k"], x["v"], ids, x["q_positions"], x["kv_lengths"],
                         d_out, d_lse, block_size=block_size, scale=scale)
  errors = []
  for name, a, ref, like in zip(("dq", "dk", "dv"), got, want, (x["q"], x["k"], x["v"])):
    assert a.shape == like.shape and a.dtype == like.dtype, name
    assert np.all(np.isfinite(np.asarray(a, np.float32))), f"{name} has unwritten/NaN entries"
    errors.append(C.rel_err(a, ref))
  assert max(errors) <= TOL[dtype], dict(zip(("dq", "dk", "dv"), errors))
  return got, want


KL_CASES = [("prefill_padding", jnp.float32), ("prefill_padding", jnp.bfloat16),
            ("partial_block_gqa1", jnp.float32), ("chunked_prefill_gqa8", jnp.float32),
            ("decode_gqa16", jnp.float32)]


def check_kl_grads(implementation, name, dtype, seed, ids=None):
  """``indexer_kl_loss`` with a Pallas ``implementation`` (interpret mode: its k_idx gradient
  runs the backward kernels) against the reference's value and autodiff gradient (the "xla"
  implementation, float32): same loss, gradients in q_idx and k_idx, none in q and k.
  Returns the kernel path's (d q_idx, d k_idx)."""
  import msa_jax
  case = C.CASES[name]
  x = C.make_inputs(case, dtype, seed=seed)
  if ids is None:
    ids = C.random_selection(case, x, seed=seed, holes=True)

  def loss_and_grads(impl, *inputs):
    f = lambda q, k, qi, ki: msa_jax.indexer_kl_loss(
        q, k, qi, ki, ids, block_size=case.block_size, implementation=impl,
        interpret=impl != "xla", **C.position_kwargs(x))
    return jax.jit(jax.value_and_grad(f, (0, 1, 2, 3)))(*inputs)

  inputs = [x[n] for n in ("q", "k", "q_idx", "k_idx")]
  loss, (dq, dk, dqi, dki) = loss_and_grads(implementation, *inputs)
  want, (_, _, want_dqi, want_dki) = loss_and_grads(
      "xla", *[jnp.asarray(a, jnp.float32) for a in inputs])
  assert float(want) > 0
  np.testing.assert_allclose(float(loss), float(want), rtol=TOL[dtype])
  assert np.all(np.asarray(dq) == 0) and np.all(np.asarray(dk) == 0)
  for got, ref, like in ((dqi, want_dqi, x["q_idx"]), (dki, want_dki, x["k_idx"])):
    assert got.shape == like.shape and got.dtype == like.dtype
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    assert C.rel_err(got, ref) <= TOL[dtype], C.rel_err(got, ref)
  return dqi, dki


def _forward(q, k, v, ids, q_positions, kv_lengths, block_size, scale):
  return reference.sparse_attention(q, k, v, ids, q_positions, kv_lengths,
                                    block_size=block_size, scale=scale)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "queries_per_item",
                                              "tiles_per_item"))
def gpu_kernel_grads(q, k, v, ids, q_positions, kv_lengths, d_out, d_lse, *, block_size,
                     scale, queries_per_item=None, tiles_per_item=2):
  """The GPU backward on the reference forward's out/lse (interpret mode; two tiles per item
  by default, so lists split into items)."""
  from msa_jax.ops.sparse_attention import gpu_triton_bwd as bwd
  out, lse = _forward(q, k, v, ids, q_positions, kv_lengths, block_size, scale)
  return bwd.sparse_attention_bwd(q, k, v, ids, q_positions, kv_lengths, out, lse, d_out,
                                  d_lse, block_size=block_size, scale=scale, interpret=True,
                                  queries_per_item=queries_per_item,
                                  tiles_per_item=tiles_per_item)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "queries_per_item",
                                              "interpret"))
def tpu_kernel_grads(q, k, v, ids, q_positions, kv_lengths, d_out, d_lse, *, block_size,
                     scale, queries_per_item=None, interpret=True):
  """The TPU backward on the reference forward's out/lse (interpret mode, or the Mosaic-TPU
  simulator with ``interpret=pltpu.InterpretParams(...)``)."""
  from msa_jax.ops.sparse_attention import tpu_bwd as bwd
  out, lse = _forward(q, k, v, ids, q_positions, kv_lengths, block_size, scale)
  return bwd.sparse_attention_bwd(q, k, v, ids, q_positions, kv_lengths, out, lse, d_out,
                                  d_lse, block_size=block_size, scale=scale,
                                  interpret=interpret, queries_per_item=queries_per_item)


KERNEL_GRADS = {"gpu": gpu_kernel_grads, "tpu": tpu_kernel_grads}
