"""selective_state_update: stepping T times equals the scan, in place, both official forms, both backends."""
import pytest
import torch

from mambakit.ops.dispatch import backend
from mambakit.ops.selective_scan import selective_scan_ref
from mambakit.ops.state_update import selective_state_update, selective_state_update_ref
from numerics import DEVICE, rel_err, triton_ok

F64 = torch.float64
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_ok, reason="no triton"))]


def rnd(*shape, g, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift).to(DEVICE)


def mamba1_inputs(b=2, d=12, n=4, l=6):
    g = torch.Generator().manual_seed(7)
    return dict(u=rnd(b, d, l, g=g), delta=rnd(b, d, l, g=g, scale=0.5, shift=-1.0),
                A=-torch.exp(rnd(d, n, g=g, scale=0.5)), B=rnd(b, n, l, g=g), C=rnd(b, n, l, g=g), D=rnd(d, g=g),
                z=rnd(b, d, l, g=g), delta_bias=rnd(d, g=g, scale=0.3), h0=rnd(b, d, n, g=g))


def step_through(update, x, state, dtype):
    """Call the per-step update for every position of a Mamba-1 scan input; returns outputs (b, d, l)."""
    outs = []
    for t in range(x["u"].shape[-1]):
        outs.append(update(state, x["u"][..., t].to(dtype), x["delta"][..., t].to(dtype), x["A"].float(),
                           x["B"][..., t].to(dtype), x["C"][..., t].to(dtype), x["D"].float(),
                           z=x["z"][..., t].to(dtype), dt_bias=x["delta_bias"].float(), dt_softplus=True))
    return torch.stack(outs, -1)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba1_steps_equal_scan(name, dtype):
    x = mamba1_inputs()
    ref, last = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                   True, True, initial_state=x["h0"])
    state = x["h0"].to(dtype if dtype != torch.float32 else torch.float32).clone()
    with backend(name):
        out = step_through(selective_state_update, x, state, dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype and state.dtype == (dtype if dtype != torch.float32 else torch.float32)
    assert rel_err(out, ref) < tol and rel_err(state, last) < tol


def mamba2_inputs(b=2, h=4, p=3, n=4, ngroups=2, l=5):
    """Per-head dt, A, dt_bias, D like Mamba-2, plus the equivalent Mamba-1 scan inputs with d = h * p."""
    g = torch.Generator().manual_seed(11)
    x = rnd(b, l, h, p, g=g)
    dt = rnd(b, l, h, g=g, scale=0.5, shift=-1.0)
    A = -torch.exp(rnd(h, g=g, scale=0.5))
    B, C = rnd(b, l, ngroups, n, g=g), rnd(b, l, ngroups, n, g=g)
    D, z, dt_bias, h0 = rnd(h, g=g), rnd(b, l, h, p, g=g), rnd(h, g=g, scale=0.3), rnd(b, h, p, n, g=g)
    d = h * p
    scan = dict(u=x.reshape(b, l, d).transpose(1, 2), delta=dt.repeat_interleave(p, -1).transpose(1, 2),
                A=A.repeat_interleave(p)[:, None].expand(d, n), B=B.permute(0, 2, 3, 1), C=C.permute(0, 2, 3, 1),
                D=D.repeat_interleave(p), z=z.reshape(b, l, d).transpose(1, 2), delta_bias=dt_bias.repeat_interleave(p),
                initial_state=h0.reshape(b, d, n))
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, h0=h0), scan


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("per_head_args", [False, True])
def test_mamba2_steps_equal_scan(name, per_head_args):
    m, scan = mamba2_inputs()
    b, l, h, p = m["x"].shape
    n = m["h0"].shape[-1]
    ref, last = selective_scan_ref(**{k: v for k, v in scan.items() if k != "initial_state"}, delta_softplus=True,
                                   return_last_state=True, initial_state=scan["initial_state"])
    state = m["h0"].float().clone()
    outs = []
    with backend(name):
        for t in range(l):
            if per_head_args:  # the convenience form: per-head tensors as they are
                dt, A, dt_bias, D = m["dt"][:, t], m["A"], m["dt_bias"], m["D"]
            else:  # the official Mamba-2 call: expanded with stride 0
                dt = m["dt"][:, t, :, None].expand(b, h, p)
                A = m["A"][:, None, None].expand(h, p, n)
                dt_bias = m["dt_bias"][:, None].expand(h, p)
                D = m["D"][:, None].expand(h, p)
            outs.append(selective_state_update(state, m["x"][:, t].float(), dt.float(), A.float(), m["B"][:, t].float(),
                                               m["C"][:, t].float(), D.float(), z=m["z"][:, t].float(),
                                               dt_bias=dt_bias.float(), dt_softplus=True))
    out = torch.stack(outs, 1).reshape(b, l, h * p).transpose(1, 2)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(state.reshape(b, h * p, n), last) < 1e-5


@pytest.mark.parametrize("name", BACKENDS)
def test_untied_mamba2_and_ref_agree(name):
    """Full (h, p, n) A and (b, h, p) dt (no stride 0): the backend matches selective_state_update_ref."""
    g = torch.Generator().manual_seed(3)
    b, h, p, n, ng = 3, 4, 5, 8, 2
    args = dict(x=rnd(b, h, p, g=g), dt=rnd(b, h, p, g=g, scale=0.5), A=-torch.exp(rnd(h, p, n, g=g)),
                B=rnd(b, ng, n, g=g), C=rnd(b, ng, n, g=g), D=rnd(h, p, g=g), z=rnd(b, h, p, g=g),
                dt_bias=rnd(h, p, g=g))
    args = {k: v.float() for k, v in args.items()}
    s0 = rnd(b, h, p, n, g=g).float()
    s_ref, s_got = s0.clone(), s0.clone()
    ref = selective_state_update_ref(s_ref, **args, dt_softplus=True)
    with backend(name):
        got = selective_state_update(s_got, **args, dt_softplus=True)
    assert rel_err(got, ref) < 1e-6 and rel_err(s_got, s_ref) < 1e-6


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_in_place_with_state_batch_indices(name, state_dtype):
    g = torch.Generator().manual_seed(5)
    b, d, n, rows = 3, 8, 4, 6
    x, dt, z = rnd(b, d, g=g).float(), rnd(b, d, g=g, scale=0.5).float(), rnd(b, d, g=g).float()
    A, D, bias = -torch.exp(rnd(d, n, g=g)).float(), rnd(d, g=g).float(), rnd(d, g=g).float()
    B, C = rnd(b, n, g=g).float(), rnd(b, n, g=g).float()
    cache = rnd(rows, d, n, g=g).to(state_dtype)
    before = cache.clone()
    idx = torch.tensor([4, 0, 2], device=DEVICE, dtype=torch.int32)
    expect_state = before[idx.long()].clone()
    expect = selective_state_update_ref(expect_state, x, dt, A, B, C, D, z, bias, True)
    ptr = cache.data_ptr()
    with backend(name):
        out = selective_state_update(cache, x, dt, A, B, C, D, z, bias, True, state_batch_indices=idx)
    assert cache.data_ptr() == ptr and cache.dtype == state_dtype
    untouched = [r for r in range(rows) if r not in idx.tolist()]
    assert torch.equal(cache[untouched], before[untouched])
    tol = 1e-6 if state_dtype == torch.float32 else 1e-2
    assert rel_err(cache[idx.long()], expect_state) < tol
    assert rel_err(out, expect) < tol and out.shape == x.shape


BAD = [
    (dict(state=torch.randn(2, 8)), "state must have 3 or 4 dimensions"),
    (dict(x=torch.randn(2, 7)), "x has shape"),
    (dict(A=torch.randn(8, 5)), "A has shape"),
    (dict(B=torch.randn(2, 5)), "B has shape"),
    (dict(state=torch.randn(3, 8, 4)), "state_batch_indices"),
    (dict(state_batch_indices=torch.tensor([0.0, 1.0])), "int32 or int64"),
    (dict(x=torch.randint(0, 2, (2, 8))), "floating-point"),
]


@pytest.mark.parametrize("bad,msg", BAD)
def test_bad_inputs_raise(bad, msg):
    args = dict(state=torch.randn(2, 8, 4), x=torch.randn(2, 8), dt=torch.randn(2, 8), A=-torch.rand(8, 4),
                B=torch.randn(2, 4), C=torch.randn(2, 4))
    args.update(bad)
    with pytest.raises(ValueError, match=msg):
        selective_state_update(**args)


def test_bad_mamba2_groups_raise():
    with pytest.raises(ValueError, match="divisible by ngroups"):
        selective_state_update(torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3), torch.randn(2, 4), -torch.rand(4),
                               torch.randn(2, 3, 5), torch.randn(2, 3, 5))


@pytest.mark.parametrize("layout", ["fp16 state", "non-contiguous fp32 state"])
def test_mamba1_form_state_copies_back(layout):
    """The Mamba-1 fast path of the PyTorch backend with states it cannot update in place."""
    x = mamba1_inputs()
    b, d, n = x["h0"].shape
    if layout == "fp16 state":
        state, ref_state = x["h0"].half(), x["h0"].half().float()
    else:  # (b, d, n) view of (b, n, d) memory
        state = x["h0"].float().transpose(1, 2).contiguous().transpose(1, 2)
        ref_state = state.clone()
    with backend("torch"):
        got = step_through(selective_state_update, x, state, torch.float32)
    ref = step_through(selective_state_update_ref, x, ref_state, torch.float32)
    tol = 2e-3 if layout == "fp16 state" else 1e-6
    assert rel_err(got, ref) < tol and rel_err(state.float(), ref_state) < tol
