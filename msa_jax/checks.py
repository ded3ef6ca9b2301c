"""Argument checks of the public API, in one place.

Every public function validates shapes, dtypes and static arguments before anything is traced
and raises ``ValueError`` naming the argument and what was expected. Ids and lengths are
range-checked when they are concrete (outside ``jit``); under ``jit`` out-of-range block ids
are ignored like -1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax import reference

IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu")

# Queries per sequence up to which a call is decode (query-outer split-K kernels, paged caches);
# above it, prefill (KV-outer).
MAX_DECODE_QUERIES = 16


def is_decode(q_len: int) -> bool:
  """Whether ``q_len`` new tokens per sequence take the decode kernels (the one threshold)."""
  return q_len <= MAX_DECODE_QUERIES


def shape_of(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def check_rank(name: str, x, rank: int, layout: str):
  if x is None or not hasattr(x, "shape") or len(shape_of(x)) != rank:
    got = None if x is None else shape_of(x)
    raise ValueError(f"{name} must be a rank-{rank} array {layout}; got shape {got}")


def check_float(name: str, x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array (bfloat16/float16/float32); "
                     f"got dtype {x.dtype}")


def check_int(name: str, x, layout: str):
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array {layout}; got dtype {x.dtype}")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
  """``value`` as a Python int (NumPy integers too); ``ValueError`` if not an int >= minimum."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
      or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
  return int(value)


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_qkv(q, k, v):
  check_rank("q", q, 4, "[batch, q_len, q_heads, head_dim]")
  check_rank("k", k, 4, "[batch, kv_len, kv_heads, head_dim]")
  check_rank("v", v, 4, "[batch, kv_len, kv_heads, v_head_dim]")
  for name, x in (("q", q), ("k", k), ("v", v)):
    check_float(name, x)
  b, t, hq, d = q.shape
  if k.shape[0] != b or v.shape[0] != b:
    raise ValueError(f"batch mismatch: q has batch {b}, k {k.shape[0]}, v {v.shape[0]}")
  if k.shape[3] != d:
    raise ValueError(f"k must have head_dim {d} (as q): expected [{b}, S, G, {d}], "
                     f"got {k.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must match k in [batch, kv_len, kv_heads]: expected "
                     f"{list(k.shape[:3])} + [Dv], got {list(v.shape)}")
  if k.shape[1] < 1:
    raise ValueError(f"k and v must hold at least one key (kv_len >= 1); got k {k.shape}")
  g = k.shape[2]
  if g < 1 or hq % g:
    raise ValueError(f"q_heads ({hq}) must be a multiple of kv_heads = groups G ({g}); "
                     f"q {q.shape}, k {k.shape}")
  if q.dtype != k.dtype or k.dtype != v.dtype:
    raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def check_index_qk(q_idx, k_idx, batch=None, q_len=None, kv_len=None, groups=None):
  check_rank("q_idx", q_idx, 4, "[batch, q_len, groups, index_dim]")
  check_rank("k_idx", k_idx, 3, "[batch, kv_len, index_dim]")
  check_float("q_idx", q_idx)
  check_float("k_idx", k_idx)
  b, t, g, di = q_idx.shape
  if k_idx.shape[0] != b:
    raise ValueError(f"batch mismatch: q_idx has batch {b}, k_idx {k_idx.shape[0]}")
  if k_idx.shape[2] != di:
    raise ValueError(f"k_idx must have index_dim {di} (as q_idx): expected [{b}, S, {di}], "
                     f"got {k_idx.shape}")
  if k_idx.shape[1] < 1:
    raise ValueError(f"k_idx must hold at least one key (kv_len >= 1); got {k_idx.shape}")
  if batch is not None and b != batch:
    raise ValueError(f"batch mismatch: q has batch {batch}, q_idx {b}")
  if q_len is not None and t != q_len:
    raise ValueError(f"q_idx must have q_len {q_len} (as q): expected [{batch}, {q_len}, "
                     f"{groups}, Di], got {q_idx.shape}")
  if kv_len is not None and k_idx.shape[1] != kv_len:
    raise ValueError(f"k_idx must have kv_len {kv_len} (as k): expected [{batch}, {kv_len}, "
                     f"Di], got {k_idx.shape}")
  if groups is not None and g != groups:
    raise ValueError(f"q_idx must have one index head per KV group: expected {groups} groups "
                     f"(k has {groups} kv_heads), got q_idx shape {q_idx.shape}")


def resolve_lengths(name: str, lengths, batch: int, limit: int, bound: str, why: str):
  """``lengths [batch]`` (integers in [0, limit] when concrete) as int32. ``bound`` and
  ``why`` name the limit in the error message."""
  layout = f"[batch={batch}]"
  check_rank(name, lengths, 1, layout)
  check_int(name, lengths, layout)
  if shape_of(lengths) != (batch,):
    raise ValueError(f"{name} must have shape [{batch}]; got {shape_of(lengths)}")
  if is_concrete(lengths):
    arr = np.asarray(lengths)
    if arr.size and (arr.min() < 0 or arr.max() > limit):
      raise ValueError(f"{name} must lie in [0, {bound}] ({why}); got {arr}")
  return jnp.asarray(lengths, jnp.int32)


def resolve_q_positions(q_positions, lengths, batch: int, q_len: int):
  """``q_positions [batch, q_len]`` as int32; by default the last ``q_len`` positions before
  ``lengths``."""
  if q_positions is None:
    return reference.default_q_positions(q_len, lengths)
  layout = f"[batch={batch}, q_len={q_len}]"
  check_rank("q_positions", q_positions, 2, layout)
  check_int("q_positions", q_positions, layout)
  if shape_of(q_positions) != (batch, q_len):
    raise ValueError(f"q_positions must have shape [{batch}, {q_len}]; "
                     f"got {shape_of(q_positions)}")
  return jnp.asarray(q_positions, jnp.int32)


def resolve_positions(q_positions, kv_lengths, batch: int, q_len: int, kv_len: int):
  """(q_positions, kv_lengths) of a contiguous cache of ``kv_len`` keys, defaults filled."""
  if kv_lengths is None:
    kv_lengths = jnp.full((batch,), kv_len, jnp.int32)
  else:
    kv_lengths = resolve_lengths("kv_lengths", kv_lengths, batch, kv_len, str(kv_len),
                                 "the key length")
  return resolve_q_positions(q_positions, kv_lengths, batch, q_len), kv_lengths


def check_block_indices(block_indices, batch, q_len, groups, num_blocks):
  layout = f"[batch={batch}, q_len={q_len}, groups={groups}, topk]"
  check_rank("block_indices", block_indices, 4, layout)
  check_int("block_indices", block_indices, layout)
  if shape_of(block_indices)[:3] != (batch, q_len, groups):
    raise ValueError(f"block_indices must have shape {layout}; got {shape_of(block_indices)}")
  if block_indices.shape[3] < 1:
    raise ValueError(f"block_indices must hold at least one slot per (query, group); "
                     f"got shape {shape_of(block_indices)}")
  if is_concrete(block_indices):
    arr = np.asarray(block_indices)
    if arr.size and (arr.max() >= num_blocks or arr.min() < -1):
      raise ValueError(f"block_indices must be -1 or a block id in [0, {num_blocks}) "
                       f"({num_blocks} blocks of the keys); got values in "
                       f"[{arr.min()}, {arr.max()}]")


def resolve_implementation(implementation, interpret) -> str:
  if implementation is None:
    backend = jax.default_backend()
    if backend == "tpu":
      return "pallas_tpu"
    if backend == "gpu" or interpret:
      return "pallas_gpu"
    return "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None; "
                     f"got {implementation!r}")
  return implementation


def check_static(block_size, topk=None):
  """(block_size, topk) checked and as Python ints (a NumPy integer is accepted)."""
  block_size = check_positive_int("block_size", block_size)
  if topk is not None:
    topk = check_positive_int("topk", topk)
  return block_size, topk


def is_empty(*sizes) -> bool:
  """True when a batch or query length is 0: the result is an empty array, computed by no
  kernel (grids and chunkings of zero length are not defined)."""
  return any(int(n) == 0 for n in sizes)


def resolve_scale(scale, head_dim):
  if scale is None:
    return 1.0 / math.sqrt(head_dim)
  scale = float(scale)
  if not math.isfinite(scale) or scale <= 0:
    raise ValueError(f"scale must be a finite positive number; got {scale}")
  return scale


SCORE_DTYPES = (None, "float8_e4m3fn")


def check_score_dtype(score_dtype):
  try:
    name = None if score_dtype is None else jnp.dtype(score_dtype).name
  except TypeError:
    name = score_dtype
  if name not in SCORE_DTYPES:
    raise ValueError(f"score_dtype must be one of {SCORE_DTYPES}; got {score_dtype!r}")
  return name


def check_pages(name, pages, rank, layout, block_size, num_pages=None):
  check_rank(name, pages, rank, layout)
  check_float(name, pages)
  if pages.shape[1] != block_size:
    raise ValueError(f"the page size of {name} (axis 1 of {layout}) must equal block_size "
                     f"({block_size}); got {name} shape {shape_of(pages)}")
  if num_pages is not None and pages.shape[0] != num_pages:
    raise ValueError(f"{name} must have {num_pages} pages (as k_pages); got shape "
                     f"{shape_of(pages)}")


def check_page_table(page_table, lengths, batch, block_size, num_pages):
  layout = f"[batch={batch}, max_pages]"
  check_rank("page_table", page_table, 2, layout)
  check_int("page_table", page_table, layout)
  if page_table.shape[0] != batch or page_table.shape[1] < 1:
    raise ValueError(f"page_table must have shape {layout} with max_pages >= 1; got "
                     f"{shape_of(page_table)}")
  max_pages = page_table.shape[1]
  limit = max_pages * block_size
  lengths = resolve_lengths("lengths", lengths, batch, limit,
                            f"max_pages * block_size = {limit}",
                            f"page_table has {max_pages} pages per sequence")
  if is_concrete(lengths):
    arr = np.asarray(lengths)
    if is_concrete(page_table):
      table = np.asarray(page_table)
      used = np.arange(max_pages)[None, :] < -(-arr[:, None] // block_size)
      bad = used & ((table < 0) | (table >= num_pages))
      if bad.any():
        b, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"page_table must list a page id in [0, {num_pages}) for every page "
                         f"holding a token (j < ceil(lengths[b] / block_size)); "
                         f"page_table[{b}, {j}] = {table[b, j]} with lengths[{b}] = {arr[b]}")
  return jnp.asarray(page_table, jnp.int32), lengths


def check_queries(name, x, layout):
  check_rank(name, x, 4, layout)
  check_float(name, x)


def check_paged_index(q_idx, index_pages, block_size, groups=None, num_pages=None):
  check_queries("q_idx", q_idx, "[batch, q_len, groups, index_dim]")
  check_pages("index_pages", index_pages, 3, "[num_pages, page_size, index_dim]", block_size,
               num_pages)
  if index_pages.shape[2] != q_idx.shape[3]:
    raise ValueError(f"index_pages must have index_dim {q_idx.shape[3]} (as q_idx): expected "
                     f"[P, {block_size}, {q_idx.shape[3]}], got {shape_of(index_pages)}")
  if q_idx.dtype != index_pages.dtype:
    raise ValueError(f"q_idx and index_pages must share one dtype; got {q_idx.dtype} and "
                     f"{index_pages.dtype}")
  if groups is not None and q_idx.shape[2] != groups:
    raise ValueError(f"q_idx must have one index head per KV group: expected {groups} groups "
                     f"(k_pages has {groups} kv_heads), got q_idx shape {shape_of(q_idx)}")


def check_paged_kv(q, k_pages, v_pages, block_size):
  check_queries("q", q, "[batch, q_len, q_heads, head_dim]")
  check_pages("k_pages", k_pages, 4, "[num_pages, page_size, kv_heads, head_dim]", block_size)
  check_pages("v_pages", v_pages, 4, "[num_pages, page_size, kv_heads, v_head_dim]",
               block_size, k_pages.shape[0])
  hq, d = q.shape[2:]
  if k_pages.shape[3] != d:
    raise ValueError(f"k_pages must have head_dim {d} (as q); got shape {shape_of(k_pages)}")
  if v_pages.shape[2] != k_pages.shape[2]:
    raise ValueError(f"v_pages must have the kv_heads of k_pages ({k_pages.shape[2]}); got "
                     f"shape {shape_of(v_pages)}")
  g = k_pages.shape[2]
  if g < 1 or hq % g:
    raise ValueError(f"q_heads ({hq}) must be a multiple of kv_heads = groups G ({g}); "
                     f"q {shape_of(q)}, k_pages {shape_of(k_pages)}")
  if not q.dtype == k_pages.dtype == v_pages.dtype:
    raise ValueError(f"q, k_pages, v_pages must share one dtype; got {q.dtype}, "
                     f"{k_pages.dtype}, {v_pages.dtype}")
