"""rms_norm_fn (fused residual add) and rmsnorm_fn (gated, grouped): PyTorch path against float64 formulas on
outputs and gradients, the official dtype rules, modules, input errors, and the Triton kernels (interpreter on
CPU, tiny shapes)."""
import itertools

import pytest
import torch

from mambakit.ops import norms
from mambakit.ops.dispatch import backend
from mambakit.ops.norms import RMSNorm, RMSNormGated, rms_norm_fn, rms_norm_ref, rmsnorm_fn, rmsnorm_gated_ref
from tests.numerics import DEVICE, assert_rule, poison_, rel_err, triton_ok

F64 = torch.float64


def _run(fn, inputs, seeds):
    """Outputs of fn(*inputs) and the grads of sum(out * seed) for every tensor input (None stays None)."""
    leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum((o.double() * s).sum() for o, s in zip(outs, seeds)).backward()
    return [o.detach() for o in outs], [t.grad if isinstance(t, torch.Tensor) else None for t in leaves]


def _formula_rms(x, w, b, r, eps):
    """The float64 formula, written independently of the reference: s, y."""
    s = x + r if r is not None else x
    y = s / torch.sqrt((s * s).mean(-1, keepdim=True) + eps) * w
    return s, (y + b if b is not None else y)


# ----------------------------------------------------------------------------------------------------------
# rms_norm_fn, PyTorch path
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("has_bias,has_res,prenorm,res_fp32", list(itertools.product([False, True], repeat=4)))
def test_rms_norm_torch_all_options(has_bias, has_res, prenorm, res_fp32):
    x = torch.randn(3, 7, 40, dtype=F64)
    w = 1 + 0.3 * torch.randn(40, dtype=F64)
    b = torch.randn(40, dtype=F64) if has_bias else None
    r = torch.randn(3, 7, 40, dtype=F64) if has_res else None
    seeds = [torch.randn(3, 7, 40, dtype=F64) for _ in range(2)]

    def ours(x, w, b, r):
        return rms_norm_fn(x, w, b, residual=r, prenorm=prenorm, residual_in_fp32=res_fp32, eps=1e-5)

    def formula(x, w, b, r):
        s, y = _formula_rms(x, w, b, r, 1e-5)
        return (y, s) if prenorm else y

    with backend("torch"):
        outs, grads = _run(ours, [x, w, b, r], seeds)
    outs_f, grads_f = _run(formula, [x, w, b, r], seeds)
    tol = 1e-6 if prenorm and res_fp32 and not has_res else 1e-12  # the official rule: s comes back in fp32
    for o, of in zip(outs, outs_f):
        assert rel_err(o, of) < tol
    for name, g, gf in zip(["x", "weight", "bias", "residual"], grads, grads_f):
        assert (g is None) == (gf is None), name
        if g is not None:
            assert rel_err(g, gf) < tol, name


@pytest.mark.parametrize("has_res,res_fp32", list(itertools.product([False, True], repeat=2)))
def test_rms_norm_official_dtypes(has_res, res_fp32):
    """y in x's dtype; the prenorm residual in residual's dtype, else fp32 when asked, else x's dtype."""
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    r = torch.randn(4, 16, dtype=torch.float32) if has_res else None
    w = torch.ones(16)
    with backend("torch"):
        y, s = rms_norm_fn(x, w, residual=r, prenorm=True, residual_in_fp32=res_fp32)
    assert y.dtype == torch.bfloat16
    assert s.dtype == (torch.float32 if has_res or res_fp32 else torch.bfloat16)
    assert rel_err(s, x.double() + (r.double() if has_res else 0)) < 1e-2
    y_ref, s_ref = rms_norm_ref(x, w, residual=r, prenorm=True, residual_in_fp32=res_fp32)
    assert y_ref.dtype == y.dtype and s_ref.dtype == s.dtype


# ----------------------------------------------------------------------------------------------------------
# gated rmsnorm_fn, PyTorch path
# ----------------------------------------------------------------------------------------------------------


def _formula_gated(x, w, b, z, eps, group_size, norm_before_gate):
    gate = z * torch.sigmoid(z) if z is not None else None
    v = x * gate if gate is not None and not norm_before_gate else x
    parts = []
    for g in range(x.shape[-1] // group_size):
        vg = v[..., g * group_size:(g + 1) * group_size]
        parts.append(vg / torch.sqrt((vg * vg).mean(-1, keepdim=True) + eps))
    y = torch.cat(parts, dim=-1) * w
    y = y + b if b is not None else y
    return y * gate if gate is not None and norm_before_gate else y


@pytest.mark.parametrize("norm_before_gate,group_size,has_z,has_bias",
                         [(True, None, True, False), (False, None, True, True), (False, 8, True, False),
                          (True, 12, True, True), (False, 6, False, False), (True, None, False, True)])
def test_gated_torch_matches_formula(norm_before_gate, group_size, has_z, has_bias):
    x = torch.randn(2, 5, 24, dtype=F64)
    z = torch.randn(2, 5, 24, dtype=F64) if has_z else None
    w = 1 + 0.3 * torch.randn(24, dtype=F64)
    b = torch.randn(24, dtype=F64) if has_bias else None
    seeds = [torch.randn(2, 5, 24, dtype=F64)]
    kw = dict(eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    with backend("torch"):
        outs, grads = _run(lambda x, w, b, z: rmsnorm_fn(x, w, b, z=z, **kw), [x, w, b, z], seeds)
    outs_f, grads_f = _run(lambda x, w, b, z: _formula_gated(x, w, b, z, 1e-5, group_size or 24,
                                                              norm_before_gate), [x, w, b, z], seeds)
    assert rel_err(outs[0], outs_f[0]) < 1e-12
    assert rel_err(outs[0], rmsnorm_gated_ref(x, w, b, z, **kw)) < 1e-12
    for name, g, gf in zip(["x", "weight", "bias", "z"], grads, grads_f):
        if gf is not None:
            assert rel_err(g, gf) < 1e-12, name


def test_modules():
    norm = RMSNorm(32, eps=1e-5, dtype=F64)
    gated = RMSNormGated(32, eps=1e-5, group_size=8, norm_before_gate=False, dtype=F64)
    assert torch.equal(norm.weight, torch.ones(32, dtype=F64)) and norm.bias is None
    assert torch.equal(gated.weight, torch.ones(32, dtype=F64)) and gated.bias is None
    x, r, z = (torch.randn(2, 3, 32, dtype=F64) for _ in range(3))
    with backend("torch"):
        y, s = norm(x, residual=r, prenorm=True)
        assert rel_err(y, rms_norm_ref(x + r, norm.weight, eps=1e-5)) < 1e-12 and rel_err(s, x + r) == 0
        assert rel_err(gated(x, z), rmsnorm_gated_ref(x, gated.weight, z=z, eps=1e-5, group_size=8,
                                                      norm_before_gate=False)) < 1e-12


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 16)
    w = torch.ones(16)
    cases = [
        (lambda: rms_norm_fn(x, torch.ones(15)), "weight"),
        (lambda: rms_norm_fn(x, w, torch.ones(3)), "bias"),
        (lambda: rms_norm_fn(x, w, residual=torch.randn(4, 15)), "residual"),
        (lambda: rms_norm_fn(x.int(), w), "x"),
        (lambda: rms_norm_fn(x, w.to("meta")), "weight"),
        (lambda: rms_norm_fn(x, w, eps=-1.0), "eps"),
        (lambda: rmsnorm_fn(x, w, z=torch.randn(4, 8)), "z"),
        (lambda: rmsnorm_fn(x, w, group_size=5), "group_size"),
        (lambda: rmsnorm_fn(torch.tensor(1.0), w), "x"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


# ----------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU: tiny shapes; MAMBAKIT_TEST_DEVICE=cuda: bigger ones)
# ----------------------------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(not triton_ok, reason="triton not installed")
# HIDDEN 48 on CPU so that the group sizes below (8, 12: one a power of two, one not) divide both sizes
ROWS, HIDDEN = ((64, 768) if DEVICE == "cuda" else (6, 48))
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


def _rms_case(dtype, has_bias, has_res, res_dtype):
    x = torch.randn(2, ROWS // 2, HIDDEN, device=DEVICE, dtype=dtype)
    w = (1 + 0.3 * torch.randn(HIDDEN, device=DEVICE))
    b = torch.randn(HIDDEN, device=DEVICE) if has_bias else None
    r = torch.randn(2, ROWS // 2, HIDDEN, device=DEVICE, dtype=res_dtype) if has_res else None
    seeds = [torch.randn(2, ROWS // 2, HIDDEN, device=DEVICE, dtype=F64) for _ in range(2)]
    return [x, w, b, r], seeds


@needs_triton
@pytest.mark.parametrize("has_bias,has_res,prenorm,res_fp32", [(False, True, True, True), (True, False, False, False),
                                                               (False, False, True, True), (True, True, False, False)])
def test_triton_rms_norm_fp32(poisoned_empty, has_bias, has_res, prenorm, res_fp32):
    inputs, seeds = _rms_case(torch.float32, has_bias, has_res, torch.float32)

    def fn(x, w, b, r):
        return rms_norm_fn(x, w, b, residual=r, prenorm=prenorm, residual_in_fp32=res_fp32, eps=1e-5)

    def ref(x, w, b, r):
        return rms_norm_ref(x, w, b, residual=r, prenorm=prenorm, residual_in_fp32=res_fp32, eps=1e-5)

    with backend("triton"):
        outs, grads = _run(fn, inputs, seeds)
    outs_r, grads_r = _run(ref, [t.double() if t is not None else None for t in inputs], seeds)
    for o, o_r in zip(outs, outs_r):
        assert o.dtype == torch.float32 and rel_err(o, o_r) < 1e-5
    for name, g, g_r in zip(["x", "weight", "bias", "residual"], grads, grads_r):
        assert (g is None) == (g_r is None), name
        if g is not None:
            assert rel_err(g, g_r) < 1e-5, name


@needs_triton
def test_triton_rms_norm_bf16_block_case():
    """The Block's fused add + norm: bf16 x, fp32 residual, prenorm; kernel within 2x the bf16 torch error."""
    inputs, seeds = _rms_case(torch.bfloat16, False, True, torch.float32)

    def fn(x, w, b, r):
        return rms_norm_fn(x, w, b, residual=r, prenorm=True, residual_in_fp32=True, eps=1e-5)

    with backend("triton"):
        outs, grads = _run(fn, inputs, seeds)
    with backend("torch"):
        outs_t, grads_t = _run(fn, inputs, seeds)
    outs_r, grads_r = _run(lambda x, w, b, r: rms_norm_ref(x, w, b, residual=r, prenorm=True, eps=1e-5),
                           [t.double() if t is not None else None for t in inputs], seeds)
    assert [o.dtype for o in outs] == [o.dtype for o in outs_t] == [torch.bfloat16, torch.float32]
    for name, k, t, r in zip(["y", "residual_out", "dx", "dweight", "bias", "dresidual"], outs + grads,
                             outs_t + grads_t, outs_r + grads_r):
        if r is not None:
            assert_rule(name, k, t, r, atol=BF16_ATOL)


@needs_triton
@pytest.mark.parametrize("norm_before_gate,group_size,has_z,has_bias,dtype",
                         [(False, 8, True, False, torch.float32), (True, None, True, True, torch.float32),
                          (False, None, False, True, torch.float32), (False, 12, True, False, torch.bfloat16)])
def test_triton_gated(poisoned_empty, norm_before_gate, group_size, has_z, has_bias, dtype):
    x = torch.randn(ROWS, HIDDEN, device=DEVICE, dtype=dtype)
    z = torch.randn(ROWS, HIDDEN, device=DEVICE, dtype=dtype) if has_z else None
    w = 1 + 0.3 * torch.randn(HIDDEN, device=DEVICE)
    b = torch.randn(HIDDEN, device=DEVICE) if has_bias else None
    seeds = [torch.randn(ROWS, HIDDEN, device=DEVICE, dtype=F64)]
    kw = dict(eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)

    def fn(x, w, b, z):
        return rmsnorm_fn(x, w, b, z=z, **kw)

    with backend("triton"):
        outs, grads = _run(fn, [x, w, b, z], seeds)
    outs_r, grads_r = _run(lambda x, w, b, z: rmsnorm_gated_ref(x, w, b, z=z, **kw),
                           [t.double() if t is not None else None for t in (x, w, b, z)], seeds)
    if dtype == torch.float32:
        for name, k, r in zip(["y", "x", "weight", "bias", "z"], outs + grads, outs_r + grads_r):
            if r is not None:
                assert rel_err(k, r) < 1e-5, name
    else:
        with backend("torch"):
            outs_t, grads_t = _run(fn, [x, w, b, z], seeds)
        for name, k, t, r in zip(["y", "x", "weight", "bias", "z"], outs + grads, outs_t + grads_t,
                                 outs_r + grads_r):
            if r is not None:
                assert_rule(name, k, t, r, atol=BF16_ATOL)
