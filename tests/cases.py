"""Test cases covering docs/msa.md §8, on fresh random data (never zeros)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tests import oracle


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int
  q_len: int
  kv_len: int
  q_heads: int
  groups: int
  head_dim: int = 32
  index_dim: int = 16
  block_size: int = 16
  topk: int = 3
  kv_lengths: tuple[int, ...] | None = None
  # Explicit first position per sequence (queries are consecutive from there), else default.
  first_position: tuple[int, ...] | None = None
  index_data: str = "normal"  # "normal" | "ties" | "own_top"


CASES = {c.name: c for c in [
    # Causal prefill, GQA 2, ragged kv_lengths: the second sequence's early queries are padding.
    Case("prefill_padding", batch=2, q_len=96, kv_len=96, q_heads=4, groups=2, topk=3,
         kv_lengths=(96, 70)),
    # k covers every block: MSA equals dense causal GQA.
    Case("dense_equivalent", batch=1, q_len=64, kv_len=64, q_heads=4, groups=1, topk=8),
    # S not a multiple of Bk (partial last block), GQA 1.
    Case("partial_block_gqa1", batch=1, q_len=100, kv_len=100, q_heads=2, groups=2, topk=2),
    # Chunked prefill: T < S with explicit positions and per-sequence kv_lengths, GQA 8.
    Case("chunked_prefill_gqa8", batch=2, q_len=24, kv_len=128, q_heads=16, groups=2, topk=3,
         kv_lengths=(104, 74), first_position=(80, 50)),
    # Decode, one token per sequence, GQA 16, a sequence with a single key.
    Case("decode_gqa16", batch=3, q_len=1, kv_len=160, q_heads=16, groups=1, topk=4,
         kv_lengths=(160, 33, 1)),
    # Speculative decode: 8 query tokens per sequence.
    Case("decode8", batch=2, q_len=8, kv_len=128, q_heads=16, groups=2, topk=3,
         kv_lengths=(128, 40)),
    # Speculative decode at GQA 16 (the GPU query-outer split-K path), repeated ids via holes.
    Case("decode8_gqa16", batch=2, q_len=8, kv_len=100, q_heads=16, groups=1, topk=5,
         kv_lengths=(100, 20)),
    # topk larger than the number of blocks.
    Case("topk_exceeds_blocks", batch=1, q_len=40, kv_len=40, q_heads=4, groups=2, topk=5),
    # Exact ties in block scores (small integer data): lower block id wins.
    Case("ties", batch=1, q_len=80, kv_len=80, q_heads=4, groups=2, topk=3,
         index_data="ties"),
    # The own block is also the top scorer: it must not take two slots.
    Case("own_block_top", batch=1, q_len=80, kv_len=80, q_heads=4, groups=2, topk=3,
         index_data="own_top"),
]}

# A compact subset for the (slower) interpret-mode kernel tests.
KERNEL_CASES = ["prefill_padding", "partial_block_gqa1", "chunked_prefill_gqa8", "decode_gqa16",
                "decode8", "decode8_gqa16", "topk_exceeds_blocks", "ties", "own_block_top"]


def make_inputs(case: Case, dtype=jnp.float32, seed: int = 0):
  """Random inputs for ``case``: dict of arrays plus explicit positions and lengths."""
  rng = np.random.default_rng(seed)
  b, t, s = case.batch, case.q_len, case.kv_len
  g, hq, d, di = case.groups, case.q_heads, case.head_dim, case.index_dim

  def normal(*shape):
    return rng.standard_normal(shape).astype(np.float32)

  q, k, v = normal(b, t, hq, d), normal(b, s, g, d), normal(b, s, g, d)
  if case.index_data == "ties":
    q_idx = rng.integers(-1, 2, (b, t, g, di)).astype(np.float32)
    k_idx = rng.integers(-1, 2, (b, s, di)).astype(np.float32)
  elif case.index_data == "own_top":
    u = np.abs(normal(di)) + 0.5
    q_idx = np.broadcast_to(u, (b, t, g, di)) + 0.01 * normal(b, t, g, di)
    k_idx = u * (np.arange(s)[None, :, None] / s) + 0.01 * normal(b, s, di)
  else:
    q_idx, k_idx = normal(b, t, g, di), normal(b, s, di)
  kv_lengths = np.array(case.kv_lengths or (s,) * b, np.int32)
  if case.first_position is None:
    q_positions = (kv_lengths[:, None] - t + np.arange(t)[None, :]).astype(np.int32)
    explicit = False
  else:
    q_positions = (np.array(case.first_position)[:, None] + np.arange(t)[None, :]).astype(
        np.int32)
    explicit = True
  cast = lambda x: jnp.asarray(np.ascontiguousarray(x), dtype)
  return dict(q=cast(q), k=cast(k), v=cast(v), q_idx=cast(q_idx), k_idx=cast(k_idx),
              q_positions=jnp.asarray(q_positions), kv_lengths=jnp.asarray(kv_lengths),
              explicit_positions=explicit)


def position_kwargs(inputs, always=False):
  """kwargs for the public API: explicit positions only where the case needs them."""
  kw = {"kv_lengths": inputs["kv_lengths"]}
  if always or inputs["explicit_positions"]:
    kw["q_positions"] = inputs["q_positions"]
  return kw


def random_selection(case: Case, inputs, seed: int = 0, holes: bool = False):
  """A random valid selection: own block plus random visible blocks, shuffled, -1 padded.

  With ``holes``, -1 entries and repeated ids are scattered inside the list too
  (``sparse_attention`` must treat -1 as none and a repeat as one block).
  """
  rng = np.random.default_rng(seed + 1000)
  pos = np.asarray(inputs["q_positions"])
  kvl = np.asarray(inputs["kv_lengths"])
  b_, t_ = pos.shape
  out = np.full((b_, t_, case.groups, case.topk), -1, np.int32)
  for b in range(b_):
    for t in range(t_):
      last = min(pos[b, t], kvl[b] - 1)
      if last < 0:
        continue
      own = last // case.block_size
      for g in range(case.groups):
        others = rng.permutation(own)[:case.topk - 1]
        chosen = rng.permutation(np.concatenate([[own], others]))
        if holes and len(chosen) > 1 and rng.random() < 0.5:
          chosen = np.concatenate([chosen, [chosen[0]]])
        row = np.full(case.topk, -1)
        row[:min(len(chosen), case.topk)] = chosen[:case.topk]
        if holes:
          row = rng.permutation(row)
        out[b, t, g] = row
  return jnp.asarray(out)


def oracle_attention(case: Case, inputs, block_indices, scale=None):
  scale = scale if scale is not None else 1.0 / np.sqrt(case.head_dim)
  f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  return oracle.sparse_attention(f64(inputs["q"]), f64(inputs["k"]), f64(inputs["v"]),
                                 np.asarray(block_indices), case.block_size, scale,
                                 np.asarray(inputs["q_positions"]),
                                 np.asarray(inputs["kv_lengths"]))


def rel_err(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def key(seed):
  return jax.random.PRNGKey(seed)


def spec(*shape, dtype=jnp.bfloat16):
  """An abstract input for ``lowers_to_mosaic_gpu``."""
  return jax.ShapeDtypeStruct(shape, dtype)


def lowers_to_mosaic_gpu(fn, *specs) -> bool:
  """Run the whole Pallas -> Mosaic GPU lowering of ``jax.jit(fn)`` on CPU (``jax.export``
  for CUDA): register layouts, TMA slices of swizzled buffers, wgmma operand checks. True if
  the exported module holds a Mosaic GPU kernel. (Triton kernels beside it, such as decode's
  candidate merge, carry no serialization guarantee: allowed here, since nothing is saved.)"""
  from jax import export
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*specs)
  return "mosaic_gpu" in exported.mlir_module()


def attention_specs(b, t, s_len, hq, g, d, topk):
  """Abstract (q, k, v, block_indices, q_positions, kv_lengths) of a bf16 sparse attention."""
  return (spec(b, t, hq, d), spec(b, s_len, g, d), spec(b, s_len, g, d),
          spec(b, t, g, topk, dtype=jnp.int32), spec(b, t, dtype=jnp.int32),
          spec(b, dtype=jnp.int32))
