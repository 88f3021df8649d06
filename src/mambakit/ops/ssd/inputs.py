"""Input checks and the shared pre-processing of ``mamba_chunk_scan_combined``'s arguments.

Dimension names: b batch, l seqlen, h nheads, p headdim, g ngroups, n dstate, c number of chunks.
Every backend (the loop reference, the PyTorch chunked path, the Triton kernels) goes through
:func:`check_inputs`, so they accept and reject exactly the same arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mambakit.ops._dtypes import compute_dtype
from mambakit.ops._checks import check_floating, check_same_device, check_seq_idx, check_shape, check_tensor, fail


@dataclass
class SSDArgs:
    """Checked arguments; ``seq_idx`` is derived from ``cu_seqlens`` when only the latter was given."""

    x: torch.Tensor  # (b, l, h, p)
    dt: torch.Tensor  # (b, l, h)
    A: torch.Tensor  # (h,)
    B: torch.Tensor  # (b, l, g, n)
    C: torch.Tensor  # (b, l, g, n)
    chunk_size: int
    D: torch.Tensor | None  # (h, p) or (h,)
    z: torch.Tensor | None  # (b, l, h, p)
    dt_bias: torch.Tensor | None  # (h,)
    initial_states: torch.Tensor | None  # (b, h, p, n)
    seq_idx: torch.Tensor | None  # (b, l) int
    cu_seqlens: torch.Tensor | None  # (num_seqs + 1,) int
    dt_softplus: bool
    dt_limit: tuple[float, float]

    @property
    def compute_dtype(self) -> torch.dtype:
        """fp32 internal math whatever the input dtype; float64 inputs stay float64 (tests' reference)."""
        return compute_dtype(self.x)


def check_inputs(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                 cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                 return_varlen_states=False) -> SSDArgs:
    """Validate shapes, dtypes and devices; raise ValueError naming the argument and the expectation."""
    check_tensor("x", x, 4, "(batch, seqlen, nheads, headdim)")
    b, l, h, p = x.shape
    check_shape("dt", dt, (b, l, h), "(batch, seqlen, nheads)")
    check_shape("A", A, (h,), "(nheads,)")
    check_tensor("B", B, 4, "(batch, seqlen, ngroups, dstate)")
    g, n = B.shape[2], B.shape[3]
    if B.shape[:2] != (b, l):
        fail(f"B has shape {tuple(B.shape)}, expected (batch={b}, seqlen={l}, ngroups, dstate)")
    check_shape("C", C, B.shape, "(batch, seqlen, ngroups, dstate), like B")
    if g < 1 or h % g != 0:
        fail(f"ngroups={g} (B.shape[2]) must divide nheads={h}; head i uses group i // (nheads // ngroups)")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        fail(f"chunk_size must be a positive int, got {chunk_size!r}")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        fail(f"D has shape {tuple(D.shape)}, expected ({h},) (nheads,) or ({h}, {p}) (nheads, headdim)")
    if z is not None:
        check_shape("z", z, x.shape, "(batch, seqlen, nheads, headdim), like x")
    if dt_bias is not None:
        check_shape("dt_bias", dt_bias, (h,), "(nheads,)")
    if initial_states is not None:
        check_shape("initial_states", initial_states, (b, h, p, n), "(batch, nheads, headdim, dstate)")
    check_floating(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states)
    check_same_device("x", x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                      cu_seqlens=cu_seqlens)
    lo, hi = _check_dt_limit(dt_limit)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, b, l)
        if seq_idx is None:
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, l)
    elif return_varlen_states:
        fail("return_varlen_states=True needs cu_seqlens (the packed sequences' cumulative lengths)")
    check_seq_idx(seq_idx, b, l, x.device)
    return SSDArgs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                   bool(dt_softplus), (lo, hi))


def _check_dt_limit(dt_limit) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        fail(f"dt_limit must be a pair (min, max) of floats, got {dt_limit!r}")
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        fail(f"dt_limit must satisfy min <= max, got {dt_limit!r}")
    return lo, hi


def _check_cu_seqlens(cu_seqlens, batch: int, seqlen: int) -> None:
    check_tensor("cu_seqlens", cu_seqlens, 1, "(num_seqs + 1,)")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        fail(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if batch != 1:
        fail(f"cu_seqlens describes sequences packed into batch 1, but x has batch={batch}")
    if cu_seqlens.numel() < 2:
        fail("cu_seqlens needs at least 2 entries: [0, len_0, len_0 + len_1, ...]")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != seqlen or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        fail(f"cu_seqlens must be non-decreasing from 0 to seqlen={seqlen}, got first={first}, last={last}")


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(num_seqs + 1,) cumulative lengths -> (1, seqlen) int32 sequence id of every position."""
    pos = torch.arange(seqlen, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True).to(torch.int32)[None]


def dt_limited(dt_limit: tuple[float, float]) -> bool:
    """The official op clamps dt only when a limit other than the default (0, inf) is given."""
    return tuple(dt_limit) != (0.0, float("inf"))


def process_dt(dt: torch.Tensor, dt_bias, dt_softplus: bool, dt_limit, dtype: torch.dtype) -> torch.Tensor:
    """dt: (b, l, h) -> dt + dt_bias, then softplus, then clamp to dt_limit, in ``dtype``."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        # softplus(x) = x for x > 20, like torch's default threshold and the official kernels
        dt = F.softplus(dt)
    if dt_limited(dt_limit):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    return dt


def apply_skip_and_gate(y: torch.Tensor, x: torch.Tensor, D, z) -> torch.Tensor:
    """y, x, z: (b, l, h, p), D: (h, p) or (h,) -> (y + D x) * silu(z), in y's dtype."""
    if D is not None:
        Dv = D.to(y.dtype)
        y = y + x.to(y.dtype) * (Dv if Dv.dim() == 2 else Dv[:, None])
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y
