"""Input checks shared by the ops: clear messages that name the argument, its shape and what was expected.

Never ``assert`` on user input (it vanishes under ``python -O``).
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch


def fail(msg: str) -> None:
    raise ValueError(msg)


def check_tensor(name: str, t, ndim: int | Sequence[int], dims: str = "") -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank(s); ``dims`` names the dimensions for the message."""
    if not isinstance(t, torch.Tensor):
        fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if t.dim() not in ranks:
        want = " or ".join(str(r) for r in ranks)
        hint = f" ({dims})" if dims else ""
        fail(f"{name} must have {want} dimensions{hint}, got shape {tuple(t.shape)}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], dims: str = "") -> torch.Tensor:
    """Check ``t.shape == expected``; ``dims`` names the dimensions, e.g. '(batch, dim, seqlen)'."""
    if not isinstance(t, torch.Tensor):
        fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(expected):
        hint = f" {dims}" if dims else ""
        fail(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}{hint}")
    return t


def check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    """All given tensors must live on ``reference``'s device (None entries are skipped)."""
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            fail(f"{name} is on {t.device} but {reference_name} is on {reference.device}; move them to one device")


def check_floating(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            fail(f"{name} must be a floating-point tensor, got {t.dtype}")


# The last seq_idx found non-decreasing: a weak reference to the tensor object and its version counter. One
# forward pass hands the same tensor to the conv and the scan of every layer, and checking its order reads it
# back to the host (a device sync on CUDA), so it is checked once rather than twice per layer. A new tensor, or
# the same one written to since, is checked again.
_last_ordered_seq_idx: tuple | None = None


def check_seq_idx(seq_idx: torch.Tensor | None, batch: int, seqlen: int, device: torch.device) -> None:
    """``seq_idx``: (batch, seqlen) integer sequence ids, non-decreasing along seqlen (packed sequences)."""
    global _last_ordered_seq_idx
    if seq_idx is None:
        return
    check_shape("seq_idx", seq_idx, (batch, seqlen), "(batch, seqlen)")
    if seq_idx.dtype not in (torch.int32, torch.int64):
        fail(f"seq_idx must be int32 or int64, got {seq_idx.dtype}")
    if seq_idx.device != device:
        fail(f"seq_idx is on {seq_idx.device} but the inputs are on {device}")
    if seqlen <= 1:
        return
    # Inference-mode tensors keep no version counter, so they are checked at every call.
    version = None if seq_idx.is_inference() else seq_idx._version
    last = _last_ordered_seq_idx
    if version is not None and last is not None and last[0]() is seq_idx and last[1] == version:
        return
    if bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        fail("seq_idx must be non-decreasing along the sequence (one id per packed sequence, in order)")
    if version is not None:
        _last_ordered_seq_idx = (weakref.ref(seq_idx), version)


class PassedChecks:
    """The argument layouts that passed an op's input checks, so that a decode loop calling the op again with
    the same layouts skips them (on a CPU the checks cost as much as a small layer's arithmetic).

    A layout is each tensor's (shape, dtype, device) and every other argument's value. Use it only for checks
    that depend on nothing else: ranks, shapes, dtypes, devices, option values. At most ``maxsize`` layouts
    are kept; then the set starts again.
    """

    def __init__(self, maxsize: int = 256):
        self._seen: set = set()
        self._maxsize = maxsize

    @staticmethod
    def layout(*args):
        """A hashable key of the arguments, or None when one of them cannot be keyed (never memoised)."""
        key = []
        for a in args:
            if isinstance(a, torch.Tensor):
                key.append((a.shape, a.dtype, a.device))
            elif a is None or isinstance(a, (bool, int, float, str)):
                key.append(a)
            else:
                return None
        return tuple(key)

    def __contains__(self, key) -> bool:
        return key is not None and key in self._seen

    def add(self, key) -> None:
        if key is None:
            return
        if len(self._seen) >= self._maxsize:
            self._seen.clear()
        self._seen.add(key)

    def once(self, check, *args) -> None:
        """``check(*args)``, unless these arguments' layout passed it before."""
        key = self.layout(*args)
        if key not in self:
            check(*args)
            self.add(key)

