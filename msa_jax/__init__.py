"""msa_jax: MiniMax Sparse Attention (MSA) in JAX and Pallas.

Public API (``spec/msa.md``, ``design.md``):

* ``index_topk``: the index branch's block selection (block-max scores, own block forced,
  exp-free top-k).
* ``sparse_attention``: exact attention over selected KV blocks (KV-outer Pallas kernels).
* ``msa_attention``: both, composed.
* ``indexer_kl_loss``: the KL loss that trains the index branch.
"""

from msa_jax.api import IMPLEMENTATIONS
from msa_jax.api import index_topk
from msa_jax.api import indexer_kl_loss
from msa_jax.api import msa_attention
from msa_jax.api import sparse_attention

__version__ = "0.1.0"

__all__ = ["IMPLEMENTATIONS", "index_topk", "indexer_kl_loss", "msa_attention",
           "sparse_attention", "__version__"]
