"""The time-parallel Mamba-1 backward (scan_bwd_time) against float64 autograd through the loop reference and
against the channel-parallel scan_bwd: all nine gradients. On CPU the kernels run in Triton's interpreter,
so the shapes are tiny: 37 steps in chunks of 8 or 16 (the last one partial), 6 or 8 channels."""
import pytest
import torch

from mambakit.ops.dispatch import backend
from mambakit.ops.selective_scan import selective_scan_fn, selective_scan_ref
from numerics import DEVICE, assert_rule, poison_, rel_err, triton_ok

pytestmark = pytest.mark.skipif(not triton_ok, reason="triton not installed")

F64 = torch.float64
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")  # scan_bwd's gradient order
LOW = ("u", "delta", "z", "B", "C")  # in the run's dtype; the parameters stay float32


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-filled kernel outputs (the forward's saved states and every buffer of scan_bwd_time)."""
    from mambakit.ops import _triton_selective_scan as k

    monkeypatch.setattr(k, "_empty", lambda *a, **kw: poison_(torch.empty(*a, **kw)))
    monkeypatch.setattr(k, "_empty_like", lambda *a, **kw: poison_(torch.empty_like(*a, **kw)))


def make_inputs(b, d, l, n, bc, options=True):
    """float64 inputs; dt stays O(0.1-1) so that states neither die nor blow up. options: D, z, delta_bias and
    an initial state (and the tests then use softplus)."""
    g = torch.Generator().manual_seed(4321 + 7 * l + n)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift).to(DEVICE)

    # without options (no softplus) delta is dt itself: keep it positive
    delta = r(b, d, l, scale=0.5, shift=-1.0) if options else r(b, d, l, scale=0.1, shift=0.4).abs()
    x = dict(u=r(b, d, l), delta=delta, A=-torch.exp(r(d, n, scale=0.5)))
    shape = {"const": (d, n), "step": (b, n, l), "group": (b, 2, n, l)}[bc]
    x["B"], x["C"] = r(*shape), r(*shape)
    if options:
        x.update(D=r(d), z=r(b, d, l), delta_bias=r(d, scale=0.3), initial_state=r(b, d, n))
    return x


def packed_seq_idx(b, l):
    """Row 0: sequences starting at 11 (inside a chunk), 24 (a boundary of 8-step chunks, inside a 16-step
    one) and 32 (a boundary of both); row 1: one starting at 16."""
    s = torch.zeros(b, l, dtype=torch.int64)
    for t in (11, 24, 32):
        s[0, t:] += 1
    s[1:, 16:] = 1
    return s.to(DEVICE)


def upstream(x, dlast=True):
    """dout (b, d, l) and dlast (b, d, n), rounded to bfloat16 so that every precision sees the same ones."""
    g = torch.Generator().manual_seed(99)
    dout = torch.randn(x["u"].shape, generator=g).bfloat16().to(F64).to(DEVICE)
    b, d, n = x["u"].shape[0], x["u"].shape[1], x["A"].shape[1]
    dl = torch.randn(b, d, n, generator=g).bfloat16().to(F64).to(DEVICE) if dlast else None
    return dout, dl


def autograd_grads(fn, x, seq_idx, softplus, dout, dlast):
    """Gradients of <out, dout> + <last, dlast> for every input in x, through fn (selective_scan_fn's API)."""
    x = {k: v.detach().requires_grad_() for k, v in x.items()}
    kw = {k: v for k, v in x.items() if k not in ("u", "delta", "A", "B", "C")}
    out, last = fn(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus=softplus, return_last_state=True,
                   seq_idx=seq_idx, **kw)
    loss = (out.double() * dout).sum() + ((last.double() * dlast).sum() if dlast is not None else 0.0)
    names = [k for k in NAMES if k in x]
    return dict(zip(names, torch.autograd.grad(loss, [x[k] for k in names])))


def cast(x64, dtype):
    return {k: v.to(dtype if k in LOW else torch.float32) for k, v in x64.items()}


def forward_states(x, seq_idx, softplus, seg):
    """The channel-parallel forward's states before every seg-step chunk."""
    from mambakit.ops import _triton_selective_scan as k

    force = {"kernel": "channel"} if "kernel" in k.FWD_CONFIG else {}  # the time forward picks its own seg
    *_, states, got_seg = k.scan_fwd(
        x["u"], x["delta"], x["A"], x["B"], x["C"], x.get("D"), x.get("z"), x.get("delta_bias"),
        x.get("initial_state"), seq_idx, softplus, True, seg=seg, chunk=min(4, seg), block_d=4, parts=1, **force)
    assert got_seg == seg
    return states


def backward(launcher, x, seq_idx, softplus, states, seg, dout, dlast, **cfg):
    """{input name: gradient} from scan_bwd or scan_bwd_time, for the inputs present in x."""
    grads = launcher(x["u"], x["delta"], x["A"], x["B"], x["C"], x.get("D"), x.get("z"), x.get("delta_bias"),
                     seq_idx, states, seg, dout.to(x["u"].dtype),
                     dlast.float() if dlast is not None else None, softplus, **cfg)
    return {k: gr for k, gr in zip(NAMES, grads) if k in x}


def assert_close(name, got, ref, tol, atol=1e-6):
    """||got - ref|| <= tol ||ref|| + atol (an absolute floor for references that can be exactly zero)."""
    err = (got.detach().double().cpu() - ref.detach().double().cpu()).norm()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all() and err <= tol * ref.double().norm() + atol, \
        f"{name}: rel err {rel_err(got, ref):.2e} above {tol}"


FP32_CASES = [  # (B/C layout, d, n, seg, seq_idx, options, config of scan_bwd_time)
    ("const", 6, 3, 8, True, True, dict(block_d=4)),  # 6 channels: the second block of 4 half masked
    ("step", 8, 4, 8, True, True, dict(block_d=1, unroll=True)),  # the unrolled state loop
    ("group", 8, 3, 16, True, True, dict(block_d=2)),
    ("group", 8, 4, 8, False, True, dict(block_d=4, chunk=16)),  # chunks of two checkpoint segments
    ("step", 8, 3, 8, True, False, dict(block_d=2)),  # no D, z, bias, initial state; no softplus
]


@pytest.mark.parametrize("bc,d,n,seg,packed,options,cfg", FP32_CASES)
def test_fp32_matches_reference_and_scan_bwd(poisoned, bc, d, n, seg, packed, options, cfg):
    from mambakit.ops import _triton_selective_scan as k
    from mambakit.ops._triton_scan_time_bwd import scan_bwd_time

    b, l = 2, 37
    x64 = make_inputs(b, d, l, n, bc, options)
    seq_idx = packed_seq_idx(b, l) if packed else None
    dout, dlast = upstream(x64)
    ref = autograd_grads(selective_scan_ref, x64, seq_idx, options, dout, dlast)
    x = cast(x64, torch.float32)
    states = forward_states(x, seq_idx, options, seg)
    got = backward(scan_bwd_time, x, seq_idx, options, states, seg, dout, dlast, **cfg)
    old = backward(k.scan_bwd, x, seq_idx, options, states, seg, dout, dlast, chunk=4, block_d=4, parts=1)
    for name in ref:
        assert got[name].dtype == old[name].dtype, name
        assert_close(f"d{name} vs reference", got[name], ref[name], 1e-5)
        assert_close(f"d{name} vs scan_bwd", got[name], old[name], 1e-5)


def test_length_one(poisoned):
    """l = 1: one chunk of which only the first step is real; dA's reference is exactly 0 without an initial
    state (the floor of assert_close covers the kernel's rounding where FMAs contract g (h - dt u B))."""
    from mambakit.ops._triton_scan_time_bwd import scan_bwd_time

    x64 = make_inputs(2, 8, 1, 4, "group", options=False)
    dout, _ = upstream(x64)
    ref = autograd_grads(selective_scan_ref, x64, None, True, dout, None)
    x = cast(x64, torch.float32)
    seg = 2  # the channel forward's smallest
    got = backward(scan_bwd_time, x, None, True, forward_states(x, None, True, seg), seg, dout, None, block_d=2)
    for name in ref:
        assert_close(f"d{name}", got[name], ref[name], 1e-5)


BF16_CASES = [("step", 4, 2, 8), ("group", 3, 2, 16), ("const", 4, 4, 8)]  # (B/C layout, n, block_d, seg)


@pytest.mark.parametrize("bc,n,block_d,seg", BF16_CASES)
def test_bf16_tolerance_rule(poisoned, bc, n, block_d, seg):
    """bf16 u, delta, z, B, C, dout: every gradient's error against float64 at most 2x the PyTorch path's in
    bf16, plus 1e-3; du, ddelta, dz come back in bf16, the rest in fp32."""
    from mambakit.ops._triton_scan_time_bwd import scan_bwd_time

    b, l = 2, 37
    x64 = make_inputs(b, 8, l, n, bc)
    seq_idx = packed_seq_idx(b, l)
    dout, dlast = upstream(x64)
    ref = autograd_grads(selective_scan_ref, x64, seq_idx, True, dout, dlast)
    x = cast(x64, torch.bfloat16)
    with backend("torch"):
        base = autograd_grads(selective_scan_fn, x, seq_idx, True, dout, dlast)
    got = backward(scan_bwd_time, x, seq_idx, True, forward_states(x, seq_idx, True, seg), seg, dout, dlast,
                   block_d=block_d)
    for name in ref:
        want = torch.bfloat16 if name in ("u", "delta", "z") else torch.float32
        assert got[name].dtype == want, (name, got[name].dtype)
        assert_rule(f"d{name}", got[name], base[name], ref[name], atol=1e-3)


def test_pairs_with_the_time_parallel_forward(poisoned):
    """States from the time-parallel forward (its chunk = this backward's), when that module is present."""
    tk = pytest.importorskip("mambakit.ops._triton_scan_time")
    from mambakit.ops._triton_scan_time_bwd import scan_bwd_time

    b, l = 2, 37
    x64 = make_inputs(b, 8, l, 4, "group")
    seq_idx = packed_seq_idx(b, l)
    dout, dlast = upstream(x64)
    ref = autograd_grads(selective_scan_ref, x64, seq_idx, True, dout, dlast)
    x = cast(x64, torch.float32)
    *_, states, seg = tk.scan_fwd_time(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                       x["delta_bias"], x["initial_state"], seq_idx, True, True, chunk=16)
    got = backward(scan_bwd_time, x, seq_idx, True, states, seg, dout, dlast, block_d=2)
    for name in ref:
        assert_close(f"d{name}", got[name], ref[name], 1e-5)


def test_bad_layouts_and_configs_raise():
    from mambakit.ops._triton_scan_time_bwd import scan_bwd_time

    b, d, l, n, seg = 1, 4, 20, 2, 8
    u = torch.randn(b, d, l)
    A, B = -torch.rand(d, n), torch.randn(b, n, l)
    states = torch.zeros(b, 3, d, n)

    def call(u=u, states=states, seg=seg, **cfg):
        return scan_bwd_time(u, u, A, B, B, None, None, None, None, states, seg, u, None, True, **cfg)

    with pytest.raises(ValueError, match="stride 1 along seqlen"):
        call(u=torch.randn(b, l, d).transpose(1, 2))
    with pytest.raises(ValueError, match="multiple of the forward's seg"):
        call(chunk=12)  # (a chunk below seg runs chunks of seg)
    with pytest.raises(ValueError, match="steps=3 .* must be a power of two"):
        call(steps=3)
    with pytest.raises(ValueError, match="copies=0 must be at least 1"):
        call(copies=0)
    with pytest.raises(ValueError, match="states has shape"):
        call(states=torch.zeros(b, 2, d, n))
    with pytest.raises(ValueError, match="unknown scan_bwd_time config keys"):
        call(nk=2)
