"""causal_conv1d_fn / causal_conv1d_update: PyTorch path against the loop reference (float64), model invariants
(packed == separate, state continuation, step-by-step decode == full conv), input errors, and the Triton kernels
(through the interpreter on CPU: tiny shapes)."""
import pytest
import torch
import torch.nn.functional as F

from mambakit.ops import causal_conv1d as cc
from mambakit.ops.causal_conv1d import (
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from mambakit.ops.dispatch import backend
from tests.numerics import DEVICE, assert_rule, poison_, rel_err, triton_ok

F64 = torch.float64


def _inputs(batch, dim, seqlen, width, dtype=F64, device="cpu", channels_last=False, bias=True, init=False):
    x = torch.randn(batch, seqlen, dim, dtype=dtype, device=device).transpose(1, 2) if channels_last else \
        torch.randn(batch, dim, seqlen, dtype=dtype, device=device)
    w = torch.randn(dim, width, dtype=dtype, device=device) * 0.5
    b = torch.randn(dim, dtype=dtype, device=device) if bias else None
    h = torch.randn(batch, dim, width - 1, dtype=dtype, device=device) if init else None
    return x, w, b, h


def _packed_seq_idx(batch, lengths, device="cpu"):
    ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])
    return ids.to(device).unsqueeze(0).expand(batch, -1).contiguous()


def _grads(fn, tensors, seed_out):
    """Run fn, backprop a fixed random cotangent through every output, return outputs and input grads."""
    leaves = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t
              for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * s).sum() for o, s in zip(outs, seed_out))
    loss.backward()
    return [o.detach() for o in outs], [t.grad if t is not None and t.is_floating_point() else None for t in leaves]


# ----------------------------------------------------------------------------------------------------------
# PyTorch path vs reference (float64)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("seqlen", [1, 2, 63, 300])
def test_torch_path_matches_reference(width, seqlen):
    x, w, b, h = _inputs(2, 5, seqlen, width, init=True)
    seeds = [torch.randn(2, 5, seqlen, dtype=F64), torch.randn(2, 5, width - 1, dtype=F64)]

    def run(fn):
        return _grads(lambda *a: fn(*a, return_final_states=True, activation="silu"), [x, w, b, None, h], seeds)

    with backend("torch"):
        (out, fin), grads = run(lambda x, w, b, s, h, **kw: causal_conv1d_fn(x, w, b, s, h, **kw))
    (out_r, fin_r), grads_r = run(lambda x, w, b, s, h, **kw: causal_conv1d_ref(x, w, b, s, h, **kw))
    assert rel_err(out, out_r) < 1e-12 and rel_err(fin, fin_r) == 0
    for name, g, gr in zip("x weight bias seq_idx initial_states".split(), grads, grads_r):
        if gr is not None:
            assert rel_err(g, gr) < 1e-12, name


@pytest.mark.parametrize("activation", [None, "swish"])
def test_torch_path_options(activation):
    """No bias, no initial states, channels-last memory, width 1 and 5 (torch path accepts any width)."""
    for width, channels_last in ((1, False), (4, True), (5, False)):
        x, w, _, _ = _inputs(2, 6, 40, width, channels_last=channels_last, bias=False)
        with backend("torch"):
            out, fin = causal_conv1d_fn(x, w, activation=activation, return_final_states=True)
        out_r, fin_r = causal_conv1d_ref(x, w, activation=activation, return_final_states=True)
        assert rel_err(out, out_r) < 1e-12 and rel_err(fin, fin_r) == 0 if width > 1 else fin.shape[-1] == 0


def test_final_states_out_buffer_and_short_sequences():
    """final_states_out is filled and returned; seqlen < width - 1 keeps part of initial_states."""
    x, w, b, h = _inputs(2, 4, 2, 4, init=True)
    buf = torch.full((2, 4, 3), float("nan"), dtype=F64)
    with backend("torch"):
        out, fin = causal_conv1d_fn(x, w, b, initial_states=h, return_final_states=True, final_states_out=buf)
    assert fin is buf
    assert torch.equal(fin, torch.cat([h[:, :, 2:], x], dim=-1))


# ----------------------------------------------------------------------------------------------------------
# Invariants
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [2, 4])
def test_seq_idx_packed_equals_separate(width):
    lengths = [5, 1, 2, 20]
    x, w, b, h = _inputs(2, 6, sum(lengths), width, init=True)
    seq_idx = _packed_seq_idx(2, lengths)
    with backend("torch"):
        packed = causal_conv1d_fn(x, w, b, seq_idx=seq_idx, initial_states=h, activation="silu")
        start = 0
        for i, n in enumerate(lengths):
            alone = causal_conv1d_fn(x[:, :, start:start + n], w, b, initial_states=h if i == 0 else None,
                                     activation="silu")
            assert rel_err(packed[:, :, start:start + n], alone) < 1e-12, f"sequence {i}"
            start += n
    assert rel_err(packed, causal_conv1d_ref(x, w, b, seq_idx, h, activation="silu")) < 1e-12


@pytest.mark.parametrize("split", [1, 2, 30])
def test_initial_states_continue_a_prefix(split):
    """conv(second part, initial_states = final_states(first part)) == the tail of conv(whole)."""
    x, w, b, _ = _inputs(2, 6, 61, 4)
    with backend("torch"):
        full = causal_conv1d_fn(x, w, b, activation="silu")
        head, fin = causal_conv1d_fn(x[:, :, :split], w, b, activation="silu", return_final_states=True)
        tail = causal_conv1d_fn(x[:, :, split:], w, b, initial_states=fin, activation="silu")
    assert rel_err(torch.cat([head, tail], dim=-1), full) < 1e-12


@pytest.mark.parametrize("width", [2, 3, 4])
def test_update_step_by_step_equals_full_conv(width):
    """Prefill a window (state_len = width, like the Mamba modules), then decode 1 token, then 3, then 1..."""
    x, w, b, _ = _inputs(3, 6, 20, width)
    full = causal_conv1d_ref(x, w, b, activation="silu")
    prefill = 6
    state = F.pad(x[:, :, :prefill], (width - prefill, 0)) if prefill < width else x[:, :, prefill - width:prefill]
    state = state.contiguous()
    t, outs = prefill, []
    with backend("torch"):
        for n in (1, 3, 1, 4, 5):
            step = x[:, :, t] if n == 1 else x[:, :, t:t + n]
            y = causal_conv1d_update(step, state, w, b, activation="silu")
            outs.append(y.unsqueeze(-1) if n == 1 else y)
            t += n
    assert rel_err(torch.cat(outs, dim=-1), full[:, :, prefill:t]) < 1e-12
    assert torch.equal(state, x[:, :, t - width:t])


@pytest.mark.parametrize("circular", [False, True])
def test_update_matches_reference_with_indices(circular):
    """conv_state_indices picks rows of a bigger cache (others untouched); cache_seqlens: circular buffer."""
    batch, dim, width, state_len = 3, 5, 4, 6
    x = torch.randn(batch, dim, 3, dtype=F64)
    w, b = torch.randn(dim, width, dtype=F64), torch.randn(dim, dtype=F64)
    cache = torch.randn(7, dim, state_len, dtype=F64)
    idx = torch.tensor([5, 0, 3])
    seqlens = torch.tensor([0, 4, 9], dtype=torch.int32) if circular else None
    cache_ref = cache.clone()
    with backend("torch"):
        out = causal_conv1d_update(x, cache, w, b, "silu", cache_seqlens=seqlens, conv_state_indices=idx)
    out_r = causal_conv1d_update_ref(x, cache_ref, w, b, "silu", cache_seqlens=seqlens, conv_state_indices=idx)
    assert rel_err(out, out_r) < 1e-12
    assert torch.equal(cache, cache_ref)


def test_circular_update_equals_linear_update():
    """A circular buffer read at cache_seqlens gives the same outputs as the shifted window."""
    batch, dim, width = 2, 4, 4
    w = torch.randn(dim, width, dtype=F64)
    linear = torch.randn(batch, dim, width, dtype=F64)
    ring = linear.clone()
    seqlens = torch.zeros(batch, dtype=torch.int64)  # position width == 0 mod width: ring == linear layout
    with backend("torch"):
        for n in (1, 2, 1, 3):
            x = torch.randn(batch, dim, n, dtype=F64)
            a = causal_conv1d_update(x, linear, w, activation="silu")
            b = causal_conv1d_update(x, ring, w, activation="silu", cache_seqlens=seqlens)
            assert rel_err(a, b) < 1e-12
            seqlens += n


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    x, w, b, h = _inputs(2, 4, 8, 4, dtype=torch.float32, init=True)
    cases = [
        (lambda: causal_conv1d_fn(x[0], w), "x"),
        (lambda: causal_conv1d_fn(x, w[:3]), "weight"),
        (lambda: causal_conv1d_fn(x, w.unsqueeze(1)), "weight"),
        (lambda: causal_conv1d_fn(x, w, b[:2]), "bias"),
        (lambda: causal_conv1d_fn(x, w, initial_states=h[:, :, :2]), "initial_states"),
        (lambda: causal_conv1d_fn(x, w, initial_states=h.double()), "initial_states"),
        (lambda: causal_conv1d_fn(x, w, activation="relu"), "activation"),
        (lambda: causal_conv1d_fn(x, w, seq_idx=torch.zeros(2, 8)), "seq_idx"),
        (lambda: causal_conv1d_fn(x, w, seq_idx=torch.zeros(2, 7, dtype=torch.int32)), "seq_idx"),
        (lambda: causal_conv1d_fn(x.int(), w), "x"),
        (lambda: causal_conv1d_fn(x, w.to("meta")), "weight"),
        (lambda: causal_conv1d_update(x[:, :, 0], torch.zeros(2, 4, 2), w), "conv_state"),
        (lambda: causal_conv1d_update(x[:, :, 0], torch.zeros(3, 4, 4), w), "conv_state"),
        (lambda: causal_conv1d_update(x[:, :, 0], torch.zeros(2, 4, 4), w, activation="gelu"), "activation"),
        (lambda: causal_conv1d_update(x[:, :, 0], torch.zeros(2, 4, 4), w,
                                      cache_seqlens=torch.zeros(3, dtype=torch.int32)), "cache_seqlens"),
        (lambda: causal_conv1d_update(x[:, :, 0], torch.zeros(5, 4, 4), w,
                                      conv_state_indices=torch.zeros(2)), "conv_state_indices"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


# ----------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU: tiny shapes; MAMBAKIT_TEST_DEVICE=cuda: bigger ones)
# ----------------------------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(not triton_ok, reason="triton not installed")
# (batch, dim, seqlen): dim and seqlen not multiples of the tiles, seqlen > 8 so the split layout crosses groups
SHAPE = (2, 40, 300) if DEVICE == "cuda" else (2, 6, 21)
# Triton's interpreter truncates fp32 -> bf16 instead of rounding, which doubles the kernels' rounding error
# on CPU; the atol of the bf16 rule absorbs that there.
BF16_ATOL = 2e-3 if DEVICE == "cpu" else 1e-4


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty in the call comes back NaN-filled, so an element a kernel forgets to write shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return poison_(t) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def _conv_case(dtype, channels_last, width, seq, init):
    batch, dim, seqlen = SHAPE
    x, w, b, h = _inputs(batch, dim, seqlen, width, dtype=dtype, device=DEVICE, channels_last=channels_last,
                         init=init)
    s = _packed_seq_idx(batch, [5, 1, seqlen - 6], DEVICE) if seq else None
    seeds = [torch.randn(batch, dim, seqlen, dtype=F64, device=DEVICE),
             torch.randn(batch, dim, width - 1, dtype=F64, device=DEVICE)]
    return [x, w, b, s, h], seeds


def _conv_run(inputs, seeds, activation, be=None):
    def fn(x, w, b, s, h):
        return causal_conv1d_fn(x, w, b, s, h, return_final_states=True, activation=activation)
    if be is None:  # the float64 reference
        return _grads(lambda x, w, b, s, h: causal_conv1d_ref(x, w, b, s, h, return_final_states=True,
                                                               activation=activation),
                      [t.double() if t is not None and t.is_floating_point() else t for t in inputs], seeds)
    with backend(be):
        return _grads(fn, inputs, seeds)


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["seqlen-contiguous", "channels-last"])
@pytest.mark.parametrize("width,activation,seq,init", [(4, "silu", True, True), (3, None, False, True),
                                                        (2, "silu", True, False)])
def test_triton_matches_reference_fp32(poisoned_empty, channels_last, width, activation, seq, init):
    inputs, seeds = _conv_case(torch.float32, channels_last, width, seq, init)
    (out, fin), grads = _conv_run(inputs, seeds, activation, "triton")
    (out_r, fin_r), grads_r = _conv_run(inputs, seeds, activation)
    assert rel_err(out, out_r) < 1e-5 and rel_err(fin, fin_r) == 0
    assert out.stride(1 if channels_last else 2) == 1  # the output keeps the input's fast layout
    for name, g, gr in zip("x weight bias seq_idx initial_states".split(), grads, grads_r):
        if gr is not None:
            assert rel_err(g, gr) < 1e-5, name


@needs_triton
def test_triton_channels_last_chunk_and_tile_edges(monkeypatch):
    """Channels-last kernels with small chunks and channel tiles: the 3-row halos between chunks, the rows
    after a chunk that the backward reads, a last partial chunk and a partial channel tile (dim 6, tile 4)."""
    monkeypatch.setattr(cc, "_conv_blocks", lambda split, dim, seqlen, backward: (4, 12, 2))
    inputs, seeds = _conv_case(torch.float32, True, 4, True, True)
    (out, fin), grads = _conv_run(inputs, seeds, "silu", "triton")
    (out_r, fin_r), grads_r = _conv_run(inputs, seeds, "silu")
    assert rel_err(out, out_r) < 1e-5 and rel_err(fin, fin_r) == 0
    for name, g, gr in zip("x weight bias seq_idx initial_states".split(), grads, grads_r):
        if gr is not None:
            assert rel_err(g, gr) < 1e-5, name


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["seqlen-contiguous", "channels-last"])
def test_triton_bf16_within_rule(channels_last):
    """bf16 kernel error <= 2x the error of the PyTorch path in bf16 (both against float64)."""
    inputs, seeds = _conv_case(torch.bfloat16, channels_last, 4, True, False)
    (out, fin), grads = _conv_run(inputs, seeds, "silu", "triton")
    (out_t, fin_t), grads_t = _conv_run(inputs, seeds, "silu", "torch")
    (out_r, fin_r), grads_r = _conv_run(inputs, seeds, "silu")
    assert_rule("out", out, out_t, out_r, atol=BF16_ATOL)
    for name, g, gt, gr in zip("x weight bias".split(), grads, grads_t, grads_r):
        assert_rule(name, g, gt, gr, atol=BF16_ATOL)


@needs_triton
@pytest.mark.parametrize("circular", [False, True])
def test_triton_update_matches_reference(poisoned_empty, circular):
    batch, dim, width, state_len = 3, 10, 4, 5
    x = torch.randn(batch, dim, 2, device=DEVICE)
    w, b = torch.randn(dim, width, device=DEVICE), torch.randn(dim, device=DEVICE)
    cache = torch.randn(6, dim, state_len, device=DEVICE)
    idx = torch.tensor([4, 0, 2], device=DEVICE, dtype=torch.int32)
    seqlens = torch.tensor([0, 3, 9], dtype=torch.int32, device=DEVICE) if circular else None
    cache_ref = cache.double()
    with backend("triton"):
        out = causal_conv1d_update(x, cache, w, b, "silu", cache_seqlens=seqlens, conv_state_indices=idx)
        out1 = causal_conv1d_update(x[:, :, 0], cache, w, b, None, cache_seqlens=seqlens, conv_state_indices=idx)
    ref = causal_conv1d_update_ref(x.double(), cache_ref, w.double(), b.double(), "silu", cache_seqlens=seqlens,
                                   conv_state_indices=idx)
    ref1 = causal_conv1d_update_ref(x[:, :, 0].double(), cache_ref, w.double(), b.double(), None,
                                    cache_seqlens=seqlens, conv_state_indices=idx)
    assert rel_err(out, ref) < 1e-5 and rel_err(out1, ref1) < 1e-5
    assert rel_err(cache, cache_ref) < 1e-6


# Forward variants (cc.FWD_VARIANT, each layout's old "tile" kernel included): small tiles so that the walk crosses tile, span and group boundaries on
# the tiny shape (seqlen 21: spans of 2 x 8 positions, the second one partial; 3 rows of 4 channels for dim 6)
# and the prefetching row kernel crosses chunks (CHUNK 8) with a last partial chunk.
_SMALL_VARIANT_BLOCKS = {
    ("split", "walk"): dict(BLOCK_D=4, BLOCK_L=8, STEPS=2, num_warps=1),
}
FWD_VARIANTS = [("split", "tile"), ("split", "walk")]  # rows "tile": the tests above


def _use_variant(monkeypatch, layout, variant, small=True):
    monkeypatch.setitem(cc.FWD_VARIANT, layout, variant)
    if small and DEVICE == "cpu" and (layout, variant) in _SMALL_VARIANT_BLOCKS:
        monkeypatch.setitem(cc.FWD_BLOCKS, (layout, variant), _SMALL_VARIANT_BLOCKS[(layout, variant)])


@needs_triton
@pytest.mark.parametrize("layout,variant", FWD_VARIANTS)
@pytest.mark.parametrize("width,activation,seq,init", [(4, "silu", True, True), (3, None, False, True),
                                                        (2, "silu", True, False)])
def test_triton_fwd_variants_match_reference_fp32(poisoned_empty, monkeypatch, layout, variant, width,
                                                  activation, seq, init):
    """Each forward variant: outputs, final states and every gradient (the backward is shared) in fp32."""
    _use_variant(monkeypatch, layout, variant)
    inputs, seeds = _conv_case(torch.float32, layout == "rows", width, seq, init)
    (out, fin), grads = _conv_run(inputs, seeds, activation, "triton")
    (out_r, fin_r), grads_r = _conv_run(inputs, seeds, activation)
    assert rel_err(out, out_r) < 1e-5 and rel_err(fin, fin_r) == 0
    assert out.stride(2 if layout == "split" else 1) == 1
    for name, g, gr in zip("x weight bias seq_idx initial_states".split(), grads, grads_r):
        if gr is not None:
            assert rel_err(g, gr) < 1e-5, name


@needs_triton
@pytest.mark.parametrize("layout,variant", FWD_VARIANTS)
@pytest.mark.parametrize("dtype,small", [(torch.bfloat16, True), (torch.float16, False)],
                         ids=["bf16-small-tiles", "fp16-default-tiles"])
def test_triton_fwd_variants_low_precision_within_rule(monkeypatch, layout, variant, dtype, small):
    """Forward variants in fp16/bf16, with the test's small tiles and with the variant's own launch
    parameters: error <= 2x the PyTorch path's in the same dtype (both against float64)."""
    _use_variant(monkeypatch, layout, variant, small)
    inputs, seeds = _conv_case(dtype, layout == "rows", 4, True, True)
    atol = BF16_ATOL if dtype == torch.bfloat16 else 1e-4
    (out, fin), _ = _conv_run(inputs, seeds, "silu", "triton")
    (out_t, _), _ = _conv_run(inputs, seeds, "silu", "torch")
    (out_r, fin_r), _ = _conv_run(inputs, seeds, "silu")
    assert_rule("out", out, out_t, out_r, atol=atol)
    assert torch.equal(fin.double(), fin_r)


def test_unknown_fwd_variant_is_named():
    with pytest.raises(ValueError, match="no forward variant 'nope'"):
        cc._fwd_launch(True, "nope", 4, 8, None, None)


@needs_triton
def test_triton_width_above_4_is_refused_when_forced():
    x, w, _, _ = _inputs(1, 4, 8, 5, dtype=torch.float32, device=DEVICE)
    with backend("triton"), pytest.raises(ValueError, match="width"):
        causal_conv1d_fn(x, w)
