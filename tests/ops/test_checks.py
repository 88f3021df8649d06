import pytest
import torch

from mambakit.ops import backend, current_backend
from mambakit.ops._checks import check_seq_idx
from mambakit.ops.dispatch import use_triton


def test_seq_idx_order_checked_again_after_a_write():
    s = torch.tensor([[0, 0, 1, 1]])
    check_seq_idx(s, 1, 4, s.device)
    check_seq_idx(s, 1, 4, s.device)  # memoised: same tensor, same version
    s[0, 3] = 0
    with pytest.raises(ValueError, match="non-decreasing"):
        check_seq_idx(s, 1, 4, s.device)
    with pytest.raises(ValueError, match="non-decreasing"):
        check_seq_idx(torch.tensor([[1, 0]]), 1, 2, s.device)


def test_backend_switch(monkeypatch):
    x = torch.randn(2)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "torch")
    assert current_backend() == "torch" and not use_triton(x)
    with backend("auto"):
        assert current_backend() == "auto" and not use_triton(x)  # CPU tensors: PyTorch path
    monkeypatch.setenv("MAMBAKIT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MAMBAKIT_BACKEND='cuda' is not a backend"):
        current_backend()
    with pytest.raises(ValueError, match="not one of"):
        with backend("fast"):
            pass


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend("triton"):
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            use_triton(torch.randn(2))


def test_seq_idx_made_in_inference_mode():
    with torch.inference_mode():
        s = torch.tensor([[0, 1, 1]])
        check_seq_idx(s, 1, 3, s.device)
        check_seq_idx(s, 1, 3, s.device)
        with pytest.raises(ValueError, match="non-decreasing"):
            check_seq_idx(torch.tensor([[1, 0, 0]]), 1, 3, s.device)
