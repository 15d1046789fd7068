"""Fused attention kernels for BAGEL's packed, metadata-defined masks (see `pallas_flash`)."""
