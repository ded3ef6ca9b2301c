"""Top-k block selection by the index branch: Triton and Mosaic GPU kernels (prefill and
decode over contiguous keys), a Triton decode kernel over pages, and the TPU kernels."""
