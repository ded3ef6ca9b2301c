"""Flax NNX models of the MiniMax-M3 family built on msa_jax (see the models issue)."""
