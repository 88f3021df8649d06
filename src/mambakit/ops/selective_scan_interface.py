"""Official import path `mamba_ssm.ops.selective_scan_interface` -> mambakit, and ``mamba_inner_fn``.

``mamba_inner_fn`` is the official Mamba-1 "inner" function (conv -> x_proj -> dt_proj -> scan -> out_proj on a
pre-projected ``xz``). Here it is composed from mambakit's ops, which pick their kernels themselves, so it
runs on CPU and GPU and is differentiable; ``mamba_inner_ref`` is the same composition (kept for the
official name).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .causal_conv1d import causal_conv1d_fn
from .norms import rms_norm_fn
from .selective_scan import selective_scan_fn, selective_scan_ref


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                   delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None,
                   dt_rms_weight=None, b_c_dt_rms_eps=1e-6):
    """xz: (b, 2*d, l) -> (b, l, d_model). conv1d_weight: (d, w) or (d, 1, w); x_proj_weight: (r + 2n, d);
    delta_proj_weight: (d, r); out_proj_weight: (d_model, d); A: (d, n). ``checkpoint_lvl`` is accepted for
    compatibility (mambakit's kernels recompute what they need)."""
    if xz.dim() != 3 or xz.shape[1] % 2:
        raise ValueError(f"xz must be (batch, 2*dim, seqlen), got {tuple(xz.shape)}")
    if conv1d_weight.dim() == 3:
        conv1d_weight = conv1d_weight[:, 0, :]
    b, _, l = xz.shape
    n = A.shape[-1]
    rank = delta_proj_weight.shape[1]
    x, z = xz.chunk(2, dim=1)  # (b, d, l) each
    x = causal_conv1d_fn(x, conv1d_weight, conv1d_bias, activation="silu")
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (b, l, r + 2n)
    dt, B_in, C_in = torch.split(x_dbl, [rank, n, n], dim=-1)
    if dt_rms_weight is not None:
        dt = rms_norm_fn(dt, dt_rms_weight, None, eps=b_c_dt_rms_eps)
    delta = F.linear(dt, delta_proj_weight).transpose(1, 2)  # (b, d, l)
    if B is None:
        B = B_in if B_proj_bias is None else B_in + B_proj_bias.to(B_in.dtype)
        if b_rms_weight is not None:
            B = rms_norm_fn(B, b_rms_weight, None, eps=b_c_dt_rms_eps)
        B = B.transpose(1, 2)  # (b, n, l)
    if C is None:
        C = C_in if C_proj_bias is None else C_in + C_proj_bias.to(C_in.dtype)
        if c_rms_weight is not None:
            C = rms_norm_fn(C, c_rms_weight, None, eps=b_c_dt_rms_eps)
        C = C.transpose(1, 2)  # (b, n, l)
    y = selective_scan_fn(x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)  # (b, l, d_model)


mamba_inner_ref = mamba_inner_fn

__all__ = ["selective_scan_fn", "selective_scan_ref", "mamba_inner_fn", "mamba_inner_ref"]
