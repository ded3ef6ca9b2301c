"""Dense attention with MSA's visibility rule on TPUs (a Pallas flash-attention kernel); GPUs
use cuDNN and the sparse decode kernel over every block (``msa_jax.full``)."""
