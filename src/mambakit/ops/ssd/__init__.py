"""Mamba-2 SSD chunked scan: ``mamba_chunk_scan_combined`` (official signature), its loop reference and the
PyTorch chunked path. Files in reading order: inputs -> reference -> torch_path -> Triton stages
(chunk_cumsum, chunk_state, state_passing, chunk_scan) -> triton_path (autograd Function) -> combined;
split_conv1d_scan: the whole mixer after in_proj, recomputed in the backward."""

from mambakit.ops.ssd.combined import mamba_chunk_scan_combined
from mambakit.ops.ssd.reference import ssd_ref
from mambakit.ops.ssd.split_conv1d_scan import mamba_split_conv1d_scan_combined
from mambakit.ops.ssd.torch_path import ssd_chunked_torch

__all__ = ["mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined", "ssd_ref", "ssd_chunked_torch"]
