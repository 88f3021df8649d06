"""Backend choice for every op: Triton kernels or the vectorised PyTorch path.

The rule, in order:
1. ``with mambakit.ops.backend("torch" | "triton" | "auto"):`` forces a backend in this thread.
2. otherwise the environment variable ``MAMBAKIT_BACKEND=torch|triton|auto`` (read at each call).
3. ``auto`` (the default): Triton for CUDA tensors when Triton is importable, PyTorch otherwise.

Forcing ``triton`` on CPU tensors is allowed only under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how CI runs every kernel without a GPU. Nothing outside ``mambakit.ops`` imports Triton.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings

import torch

_BACKENDS = ("auto", "torch", "triton")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("mambakit_backend", default=None)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (the kernels need it; the PyTorch path does not)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, for launch heuristics (132 assumed off CUDA: H100/H200)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _pdl_device(device: torch.device) -> bool:
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:  # an older Triton
        return False
    return True


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch can be used for kernels on ``device``: sm_90+ (Hopper), a Triton with the
    grid-dependency ops, and not the interpreter. Such a kernel starts while the previous one in the stream
    finishes, and waits for it (``gdc_wait``) before touching anything that kernel may write."""
    return not interpreting() and _pdl_device(device)


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def current_backend() -> str:
    """The requested backend name: the context manager's, else MAMBAKIT_BACKEND, else 'auto'."""
    forced = _forced.get()
    if forced is not None:
        return forced
    name = os.environ.get("MAMBAKIT_BACKEND", "auto").strip().lower() or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"MAMBAKIT_BACKEND={name!r} is not a backend; use one of {', '.join(_BACKENDS)}")
    return name


@contextlib.contextmanager
def backend(name: str):
    """Force a backend for the ops called inside the block: ``with backend("torch"): ...``."""
    name = name.strip().lower()
    if name not in _BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(_BACKENDS)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


@functools.lru_cache(maxsize=None)
def _warn_no_triton_once() -> None:
    warnings.warn(
        "CUDA tensors given but Triton is not installed, so mambakit runs its (slower) PyTorch path: "
        "pip install triton",
        stacklevel=3,
    )


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op called on ``x`` should run its Triton kernel.

    Raises a clear error when Triton is forced but cannot run on this tensor.
    """
    name = current_backend()
    if name == "torch":
        return False
    if name == "auto":
        if x.device.type != "cuda":
            return False
        if not triton_available():
            _warn_no_triton_once()
            return False
        return True
    # forced "triton"
    if not triton_available():
        raise RuntimeError("MAMBAKIT_BACKEND=triton but Triton is not installed: pip install triton")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the Triton backend needs CUDA tensors, got a tensor on {x.device}; move it to the GPU, "
            "use MAMBAKIT_BACKEND=torch, or set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter"
        )
    return True
