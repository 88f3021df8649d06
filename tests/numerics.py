"""Numerical comparison helpers for kernel tests (the tolerance rule of docs/DESIGN: flash-attention's).

A kernel's error against a float64 reference must be at most ``factor`` times the error of the PyTorch
path run in the same low precision, plus a small ``atol`` (relative L2 norms throughout).
"""
import os

import torch

DEVICE = os.environ.get("MAMBAKIT_TEST_DEVICE", "cpu")
triton_ok = True
try:
    import triton  # noqa: F401
except Exception:  # pragma: no cover - triton is a test dependency
    triton_ok = False


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != reference shape {tuple(ref.shape)}")
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_rule(name: str, kernel: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor,
                factor: float = 2.0, atol: float = 1e-5) -> None:
    """kernel's error vs ref <= factor * baseline's error vs ref + atol."""
    ek, eb = rel_err(kernel, ref), rel_err(baseline, ref)
    if not ek <= factor * eb + atol:
        raise AssertionError(f"{name}: kernel rel err {ek:.3e} > {factor} x baseline {eb:.3e} + {atol:.0e}")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that an element a kernel forgets to write shows up."""
    return t.fill_(float("nan"))
