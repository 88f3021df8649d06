"""Mixers: official parameter names/shapes/init, and the model invariants of DESIGN.md
(step == forward, chunked prefill == one prefill, packed == separate)."""
import math

import pytest
import torch
import torch.nn.functional as F

from mambakit import InferenceParams, Mamba, Mamba2


def make(kind, **kw):
    torch.manual_seed(0)
    if kind == "mamba1":
        return Mamba(d_model=32, d_state=8, layer_idx=0, **kw)
    return Mamba2(d_model=64, d_state=16, headdim=16, ngroups=2, chunk_size=16, layer_idx=0, **kw)


def test_mamba1_parameters_match_official():
    m = Mamba(d_model=64, d_state=16, d_conv=4, expand=2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "A_log": (128, 16), "D": (128,), "in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4),
        "conv1d.bias": (128,), "x_proj.weight": (4 + 32, 128), "dt_proj.weight": (128, 4), "dt_proj.bias": (128,),
        "out_proj.weight": (64, 128),
    }
    assert torch.allclose(m.A_log, torch.log(torch.arange(1, 17.0)).expand(128, 16))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.all(m.D == 1)


def test_mamba2_parameters_match_official():
    m = Mamba2(d_model=128, d_state=32, headdim=32, ngroups=2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    nheads, conv_dim = 256 // 32, 256 + 2 * 2 * 32
    assert shapes == {
        "dt_bias": (nheads,), "A_log": (nheads,), "D": (nheads,),
        "in_proj.weight": (2 * 256 + 2 * 2 * 32 + nheads, 128), "conv1d.weight": (conv_dim, 1, 4),
        "conv1d.bias": (conv_dim,), "norm.weight": (256,), "out_proj.weight": (128, 256),
    }
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_step_by_step_equals_forward(kind):
    m = make(kind)
    x = torch.randn(2, 11, m.d_model)
    full = m(x)
    params = InferenceParams(max_seqlen=11, max_batch_size=2)
    outs = []
    for t in range(11):
        outs.append(m(x[:, t:t + 1], inference_params=params))
        params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
@pytest.mark.parametrize("split", [1, 2, 7])
def test_chunked_prefill_equals_one_prefill(kind, split):
    m = make(kind)
    x = torch.randn(2, 21, m.d_model)
    one = InferenceParams(max_seqlen=32, max_batch_size=2)
    y_one = m(x, inference_params=one)
    two = InferenceParams(max_seqlen=32, max_batch_size=2)
    y_a = m(x[:, :split], inference_params=two)
    two.seqlen_offset += split
    y_b = m(x[:, split:], inference_params=two)
    torch.testing.assert_close(torch.cat([y_a, y_b], 1), y_one, rtol=1e-4, atol=1e-5)
    for a, b in zip(one.key_value_memory_dict[0], two.key_value_memory_dict[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and the next decoding step agrees
    nxt = torch.randn(2, 1, m.d_model)
    one.seqlen_offset = two.seqlen_offset = 21
    torch.testing.assert_close(m(nxt, inference_params=one), m(nxt, inference_params=two), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_packed_sequences_equal_separate_runs(kind):
    m = make(kind)
    lens = [5, 1, 9]
    xs = [torch.randn(1, n, m.d_model) for n in lens]
    packed = torch.cat(xs, 1)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor(lens)).unsqueeze(0)
    expected = torch.cat([m(x) for x in xs], 1)
    torch.testing.assert_close(m(packed, seq_idx=seq_idx), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m(packed, cu_seqlens=cu), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_left_padding_does_not_leak_into_the_state(kind):
    """A row with left padding (seq_idx 0 on the pads) ends in the same state as the row alone."""
    m = make(kind)
    x = torch.randn(1, 6, m.d_model)
    pads = torch.randn(1, 2, m.d_model) * 5
    alone = InferenceParams(max_seqlen=16, max_batch_size=1)
    y_alone = m(x, inference_params=alone)
    padded = InferenceParams(max_seqlen=16, max_batch_size=1)
    seq_idx = torch.tensor([[0, 0] + [1] * 6], dtype=torch.int32)
    y_pad = m(torch.cat([pads, x], 1), inference_params=padded, seq_idx=seq_idx)
    torch.testing.assert_close(y_pad[:, 2:], y_alone, rtol=1e-4, atol=1e-5)
    for a, b in zip(alone.key_value_memory_dict[0], padded.key_value_memory_dict[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_mamba2_d_mlp_and_dt_limit_and_hdim_D():
    torch.manual_seed(0)
    m = Mamba2(d_model=64, d_state=8, headdim=16, d_ssm=64, D_has_hdim=True, dt_limit=(0.01, 0.05),
               rmsnorm=False, chunk_size=8, layer_idx=0)
    assert m.D.shape == (64,)
    x = torch.randn(2, 9, 64)
    full = m(x)
    params = InferenceParams(max_seqlen=9, max_batch_size=2)
    outs = []
    for t in range(9):
        outs.append(m(x[:, t:t + 1], inference_params=params))
        params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_bad_inputs(kind):
    m = make(kind)
    with pytest.raises(ValueError, match="expected \\(batch, seqlen"):
        m(torch.randn(2, 5, m.d_model + 1))
    with pytest.raises(ValueError, match="is empty"):
        m(torch.randn(2, 0, m.d_model))
    with pytest.raises(ValueError, match="torch.float64 but the layer.s weights are torch.float32"):
        m(torch.randn(2, 5, m.d_model, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_gradients_flow_to_every_parameter(kind):
    m = make(kind)
    x = torch.randn(2, 13, m.d_model, requires_grad=True)
    m(x).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert math.isfinite(float(x.grad.norm()))


def test_non_contiguous_input_accepted():
    m = make("mamba1")
    x = torch.randn(13, 2, m.d_model).transpose(0, 1)
    torch.testing.assert_close(m(x), m(x.contiguous()))
