"""mambakit.ops: the only place that knows about backends.

Every op has the official `mamba-ssm` / `causal-conv1d` name and signature, a Triton kernel for CUDA tensors
(forward and backward) and a vectorised PyTorch path everywhere else; ``dispatch`` picks one per call
(``MAMBAKIT_BACKEND=torch|triton|auto`` or ``with mambakit.ops.backend("torch"):``).

Dimension glossary used in every docstring:
    b  batch          l  seqlen            d  channels (d_inner or conv_dim)
    n  d_state        h  nheads (Mamba-2)  p  headdim (Mamba-2)     g  ngroups of B/C
    w  conv width (d_conv)
"""

from .causal_conv1d import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref
from .dispatch import backend, current_backend, triton_available
from .norms import RMSNorm, RMSNormGated, rms_norm_fn, rmsnorm_fn
from .selective_scan import selective_scan_fn, selective_scan_ref
from .ssd import mamba_chunk_scan_combined, ssd_ref
from .state_update import selective_state_update, selective_state_update_ref

__all__ = [
    "backend", "current_backend", "triton_available",
    "selective_scan_fn", "selective_scan_ref",
    "mamba_chunk_scan_combined", "ssd_ref",
    "causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref",
    "selective_state_update", "selective_state_update_ref",
    "RMSNorm", "RMSNormGated", "rms_norm_fn", "rmsnorm_fn",
]
