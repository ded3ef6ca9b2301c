"""Block-sparse attention over the selected blocks: KV-outer (Triton, Mosaic GPU, TPU) with
their backward passes, union-tile (query-outer) kernels, and split-K decode over pages."""
