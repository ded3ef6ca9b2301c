"""msa_jax: MiniMax Sparse Attention (MSA) in JAX and Pallas.

Public API (``docs/msa.md``):

* ``index_topk``: the index branch's block selection (block-max scores, own block forced,
  exp-free top-k).
* ``sparse_attention``: exact attention over selected KV blocks (KV-outer Pallas kernels).
* ``msa_attention``: both, composed.
* ``indexer_kl_loss``: the KL loss that trains the index branch.
* ``full_attention``: dense attention with the same visibility rule in bounded memory (the
  full-attention layers of MiniMax-M3).

Every op but ``indexer_kl_loss`` reads contiguous keys ``[B, S, ...]`` or a paged cache
(``page_table=``, pages ``[P, Bk, ...]``; ``msa_jax.paged`` holds one layer's cache,
``PagedCache``, ``write``/``append``, and the host-side ``PageAllocator``).
``paged_index_topk``, ``paged_sparse_decode``, ``paged_msa_decode`` and
``paged_full_attention`` are the earlier releases' names for them with ``page_table=``.
"""

from msa_jax.checks import IMPLEMENTATIONS
from msa_jax.checks import MAX_DECODE_QUERIES
from msa_jax.api import index_topk
from msa_jax.api import indexer_kl_loss
from msa_jax.api import msa_attention
from msa_jax.api import sparse_attention
from msa_jax.full import full_attention
from msa_jax.full import paged_full_attention
from msa_jax import paged
from msa_jax.paged import PageAllocator
from msa_jax.paged import PagedCache
from msa_jax.paged_api import paged_index_topk
from msa_jax.paged_api import paged_msa_decode
from msa_jax.paged_api import paged_sparse_decode

__version__ = "0.1.0"

__all__ = ["IMPLEMENTATIONS", "MAX_DECODE_QUERIES", "full_attention", "paged_full_attention",
           "index_topk", "indexer_kl_loss", "msa_attention", "sparse_attention", "paged",
           "PageAllocator", "PagedCache", "paged_index_topk", "paged_msa_decode",
           "paged_sparse_decode", "__version__"]
