"""The MSA ops' implementations: one folder per op, one module per implementation.

``index_topk/``, ``sparse_attention/`` and ``full_attention/`` each hold ``gpu_triton.py``
(Pallas on Triton), ``gpu_mosaic.py`` (Pallas Mosaic GPU, Hopper), ``tpu.py`` (Pallas Mosaic
TPU), as far as the op has them; ``*_paged.py`` are the few-query (decode) kernels over a paged
cache, ``*_bwd.py`` a backward beside its forward. ``common/`` holds what several ops share.
Which implementation runs for a call is decided in ``msa_jax.dispatch``; the pure-jnp
definition every one is tested against is ``msa_jax.reference``.
"""
