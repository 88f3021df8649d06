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


def test_passed_checks_keys_layouts_not_values():
    from mambakit.ops._checks import PassedChecks

    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert PassedChecks.layout(a, None, "silu", 1e-5) == PassedChecks.layout(b, None, "silu", 1e-5)
    assert PassedChecks.layout(a, 1e-5) != PassedChecks.layout(a.double(), 1e-5)
    assert PassedChecks.layout(a) != PassedChecks.layout(a.t())  # shape (3, 2)
    assert PassedChecks.layout(a, [1, 2]) is None  # not keyable: never memoised
    seen = PassedChecks(maxsize=2)
    keys = [PassedChecks.layout(torch.randn(i)) for i in (1, 2, 3)]
    for k in keys:
        seen.add(k)
    assert keys[2] in seen and None not in seen and len(seen._seen) <= 2


def test_ops_still_reject_bad_inputs_after_a_good_call():
    """A layout that passed is skipped next time; any other layout is checked again."""
    from mambakit.ops import causal_conv1d_update, rms_norm_fn, selective_state_update

    state, x, dt = torch.randn(2, 8, 4), torch.randn(2, 8), torch.randn(2, 8)
    A, B, C = -torch.rand(8, 4), torch.randn(2, 4), torch.randn(2, 4)
    for _ in range(2):
        selective_state_update(state, x, dt, A, B, C)
    with pytest.raises(ValueError, match="B has shape"):
        selective_state_update(state, x, dt, A, torch.randn(2, 5), C)
    with pytest.raises(ValueError, match="floating-point"):
        selective_state_update(state, x, dt, A, B, C.long())
    conv_state, w = torch.randn(2, 8, 4), torch.randn(8, 4)
    for _ in range(2):
        causal_conv1d_update(x, conv_state, w, activation="silu")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_update(x, conv_state, w, activation="relu")
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x, conv_state[:, :4], w)
    h, weight = torch.randn(3, 16), torch.ones(16)
    for _ in range(2):
        rms_norm_fn(h, weight, eps=1e-5)
    with pytest.raises(ValueError, match="eps"):
        rms_norm_fn(h, weight, eps=-1.0)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_fn(h, torch.ones(15), eps=1e-5)
