"""Helpers shared by the kernels of several ops (masking, Mosaic GPU pipeline pieces, shared
memory limits, the CPU interpreter shims)."""
