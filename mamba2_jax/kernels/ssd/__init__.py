"""SSD chunk scan (Mamba-2 prefill / training)."""

from mamba2_jax.kernels.ssd.api import ssd_chunk_scan
from mamba2_jax.kernels.ssd.layout import ChunkPlan, varlen_chunk_layout
from mamba2_jax.kernels.ssd.reference import ssd_chunk_scan_ref, ssd_sequential_ref

__all__ = ["ChunkPlan", "ssd_chunk_scan", "ssd_chunk_scan_ref", "ssd_sequential_ref",
           "varlen_chunk_layout"]
