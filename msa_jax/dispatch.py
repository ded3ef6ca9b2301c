"""Which code runs an op: one table from (op, implementation, query count) to a path.

``queries`` is "decode" for at most ``MAX_DECODE_QUERIES`` new tokens per sequence (decode,
speculative verification), else "prefill". Every path takes the op's queries and a
``msa_jax.source.KV`` (contiguous or paged keys) and decides, inside, what a paged source
needs: the decode kernels read pages as they lie, the prefill kernels and XLA read them
gathered. The paths live beside the kernels they call, in ``msa_jax/ops/<op>/paths.py``.
"""

from __future__ import annotations

from collections.abc import Callable

from msa_jax import checks
from msa_jax.ops.full_attention import paths as full
from msa_jax.ops.index_topk import paths as index
from msa_jax.ops.indexer_kl_loss import paths as kl
from msa_jax.ops.sparse_attention import paths as sparse

DECODE, PREFILL = "decode", "prefill"

TABLE: dict[tuple[str, str, str], Callable] = {
    # op                implementation  queries   path
    ("index_topk",       "xla",        DECODE):  index.xla,
    ("index_topk",       "xla",        PREFILL): index.xla,
    ("index_topk",       "pallas_gpu", DECODE):  index.gpu_decode,
    ("index_topk",       "pallas_gpu", PREFILL): index.gpu_prefill,
    ("index_topk",       "pallas_tpu", DECODE):  index.tpu,
    ("index_topk",       "pallas_tpu", PREFILL): index.tpu,
    ("sparse_attention", "xla",        DECODE):  sparse.xla,
    ("sparse_attention", "xla",        PREFILL): sparse.xla,
    ("sparse_attention", "pallas_gpu", DECODE):  sparse.gpu_decode,
    ("sparse_attention", "pallas_gpu", PREFILL): sparse.gpu_prefill,
    ("sparse_attention", "pallas_tpu", DECODE):  sparse.tpu_decode,
    ("sparse_attention", "pallas_tpu", PREFILL): sparse.tpu_prefill,
    ("full_attention",   "xla",        DECODE):  full.xla,
    ("full_attention",   "xla",        PREFILL): full.xla,
    ("full_attention",   "pallas_gpu", DECODE):  full.gpu_decode,
    ("full_attention",   "pallas_gpu", PREFILL): full.gpu_prefill,
    ("full_attention",   "pallas_tpu", DECODE):  full.tpu,
    ("full_attention",   "pallas_tpu", PREFILL): full.tpu,
    ("indexer_kl_loss",  "xla",        DECODE):  kl.xla,
    ("indexer_kl_loss",  "xla",        PREFILL): kl.xla,
    ("indexer_kl_loss",  "pallas_gpu", DECODE):  kl.gpu,
    ("indexer_kl_loss",  "pallas_gpu", PREFILL): kl.gpu,
    ("indexer_kl_loss",  "pallas_tpu", DECODE):  kl.tpu,
    ("indexer_kl_loss",  "pallas_tpu", PREFILL): kl.tpu,
}


def queries(q_len: int) -> str:
  """The table's query-count column for ``q_len`` new tokens per sequence."""
  return DECODE if checks.is_decode(q_len) else PREFILL


def path(op: str, implementation: str, q_len: int) -> Callable:
  """The path that runs ``op`` with ``implementation`` for ``q_len`` queries per sequence."""
  return TABLE[op, implementation, queries(q_len)]
