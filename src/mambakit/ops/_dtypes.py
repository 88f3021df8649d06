"""Dtype helpers of the PyTorch paths: they compute in fp32 (fp64 for fp64 inputs) whatever the input dtype."""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when t already has it: decoding on a CPU is bound by per-op overhead,
    and a no-op ``.to()`` costs as much as a small multiply."""
    return t if t.dtype == dtype else t.to(dtype)
