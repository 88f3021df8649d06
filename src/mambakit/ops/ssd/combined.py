"""The public op ``mamba_chunk_scan_combined``: Triton kernels for CUDA tensors, the PyTorch chunked path
elsewhere (see mambakit.ops.dispatch)."""

from __future__ import annotations

import torch

from mambakit.ops.dispatch import use_triton
from mambakit.ops.ssd.torch_path import ssd_chunked_torch

# what the Triton kernels take (mambakit.ops.ssd.triton_path checks the same); other valid inputs (float64,
# dstate or headdim above 256) run on the PyTorch path
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels_take(x, B) -> bool:
    shapes_ok = isinstance(x, torch.Tensor) and isinstance(B, torch.Tensor) and x.dim() == 4 and B.dim() == 4
    return not shapes_ok or (x.dtype in _KERNEL_DTYPES and x.shape[3] <= 256 and B.shape[3] <= 256)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    """Mamba-2 SSD scan (official ``mamba_ssm`` signature).

    x: (batch, seqlen, nheads, headdim), dt: (batch, seqlen, nheads), A: (nheads,) negative,
    B, C: (batch, seqlen, ngroups, dstate), D: (nheads, headdim) or (nheads,), z: like x (out *= silu(z)),
    dt_bias: (nheads,), initial_states: (batch, nheads, headdim, dstate), seq_idx: (batch, seqlen) int,
    cu_seqlens: (num_seqs + 1,) int for batch-1 packed input.
    Returns out (like x) [, final_states (batch, nheads, headdim, dstate) fp32]
    [, varlen_states (num_seqs, nheads, headdim, dstate) fp32].
    """
    args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus, dt_limit,
            return_final_states, return_varlen_states)
    if use_triton(x) and _kernels_take(x, B):
        from mambakit.ops.ssd.triton_path import ssd_chunked_triton  # imports Triton only on this branch

        return ssd_chunked_triton(*args)
    return ssd_chunked_torch(*args)
