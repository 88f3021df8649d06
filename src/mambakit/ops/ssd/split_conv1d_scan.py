"""``mamba_split_conv1d_scan_combined``: the whole Mamba-2 mixer after in_proj, recomputed in the backward.

The official function of the same name (``mamba_ssm.ops.triton.ssd_combined``) runs split -> causal conv1d ->
SSD scan -> gated RMSNorm -> out_proj on in_proj's output and keeps only its input for the backward, which
recomputes the rest: activation memory of about one in_proj output per layer instead of the conv output, the
scan output, the norm's input and output. Here it is a composition of mambakit's own ops (Triton kernels on
CUDA, the PyTorch paths elsewhere: no extra package) run under non-reentrant activation checkpointing
(``torch.utils.checkpoint``) when a gradient is needed. It is not one fused kernel: the recompute costs one
more forward of the conv, the scan and the norm in the backward, the price of the memory it saves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mambakit.ops.causal_conv1d import causal_conv1d_fn
from mambakit.ops.norms import rmsnorm_fn
from mambakit.ops.ssd.combined import mamba_chunk_scan_combined


def _sizes(zxbcdt, conv1d_weight, A, D, headdim, ngroups):
    """(nheads, headdim, dim, dstate) from the arguments, with clear errors for inconsistent ones."""
    if zxbcdt.dim() != 3:
        raise ValueError(f"mamba_split_conv1d_scan_combined: zxbcdt must be (batch, seqlen, 2*dim + "
                         f"2*ngroups*dstate + nheads), got shape {tuple(zxbcdt.shape)}")
    nheads = A.shape[0]
    if D.dim() == 2:
        headdim = D.shape[1]
    elif headdim is None:
        raise ValueError("mamba_split_conv1d_scan_combined: D of shape (nheads,) needs headdim=...")
    dim = nheads * headdim
    if conv1d_weight.dim() != 2:
        raise ValueError(f"mamba_split_conv1d_scan_combined: conv1d_weight must be (dim + 2*ngroups*dstate, width), "
                         f"got {tuple(conv1d_weight.shape)} (a Conv1d weight (c, 1, w) needs .squeeze(1))")
    dstate, rem = divmod(conv1d_weight.shape[0] - dim, 2 * ngroups)
    want = 2 * dim + 2 * ngroups * dstate + nheads
    if rem or dstate <= 0 or zxbcdt.shape[-1] != want:
        raise ValueError(f"mamba_split_conv1d_scan_combined: zxbcdt's last dimension {zxbcdt.shape[-1]} and "
                         f"conv1d_weight's {conv1d_weight.shape[0]} channels do not fit nheads={nheads}, "
                         f"headdim={headdim}, ngroups={ngroups} ([z, x, B, C, dt] = 2*dim + 2*ngroups*dstate + "
                         "nheads, conv over [x, B, C])")
    return nheads, headdim, dim, dstate


def _mixer(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, initial_states, rmsnorm_weight, outproj_weight,
           outproj_bias, seq_idx, *, chunk_size, dt_limit, return_final_states, activation, rmsnorm_eps, headdim,
           ngroups, norm_before_gate):
    b, l, _ = zxbcdt.shape
    nheads, headdim, dim, dstate = _sizes(zxbcdt, conv1d_weight, A, D, headdim, ngroups)
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx,
                           activation=activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    gate_in_scan = rmsnorm_weight is None
    res = mamba_chunk_scan_combined(
        x.reshape(b, l, nheads, headdim), dt, A, B.reshape(b, l, ngroups, dstate),
        C.reshape(b, l, ngroups, dstate), chunk_size, D=D, z=z.reshape(b, l, nheads, headdim) if gate_in_scan else None,
        dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=return_final_states)
    y, final = res if return_final_states else (res, None)
    y = y.reshape(b, l, dim)
    if not gate_in_scan:
        y = rmsnorm_fn(y, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
                       norm_before_gate=norm_before_gate)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final) if return_final_states else y


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """Mamba-2 mixer from in_proj's output (official ``mamba_ssm`` signature), recomputed in the backward.

    zxbcdt: (batch, seqlen, 2*dim + 2*ngroups*dstate + nheads), [z, x, B, C, dt] with dim = nheads*headdim;
    conv1d_weight: (dim + 2*ngroups*dstate, width); conv1d_bias: (dim + 2*ngroups*dstate,) or None;
    dt_bias, A: (nheads,); D: (nheads, headdim) or (nheads,) with ``headdim`` given;
    initial_states: (batch, nheads, headdim, dstate); seq_idx: (batch, seqlen) packed sequences.
    With rmsnorm_weight (dim,): y = RMSNormGated(y, z) over groups of dim // ngroups, else y = y * silu(z);
    with outproj_weight (d_model, dim): out = y @ outproj_weight.T (+ outproj_bias).
    Returns out (batch, seqlen, d_model or dim) [, final_states (batch, nheads, headdim, dstate) fp32].
    """
    tensors = (zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, initial_states, rmsnorm_weight, outproj_weight,
               outproj_bias, seq_idx)
    kw = dict(chunk_size=chunk_size, dt_limit=dt_limit, return_final_states=return_final_states,
              activation=activation, rmsnorm_eps=rmsnorm_eps, headdim=headdim, ngroups=ngroups,
              norm_before_gate=norm_before_gate)
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    if not needs_grad:
        return _mixer(*tensors, **kw)
    return checkpoint(_mixer, *tensors, use_reentrant=False, **kw)
