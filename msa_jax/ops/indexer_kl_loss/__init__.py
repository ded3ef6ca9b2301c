"""The index branch's KL training loss, with a gradient through the sparse attention kernels."""
