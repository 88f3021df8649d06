"""Mamba-2 SSD scan: the PyTorch chunked path and the Triton kernels against the loop reference ``ssd_ref``.

The torch path is compared in float64 (it must match the recurrence to rounding); the Triton kernels run through
the interpreter on tiny shapes (CPU) or at bigger shapes on a GPU (MAMBAKIT_TEST_DEVICE=cuda), fp32 and low
precision, under the tolerance rule of tests/numerics.py.
"""
import contextlib

import pytest
import torch

from mambakit.ops.dispatch import backend, interpreting
from mambakit.ops.ssd import mamba_chunk_scan_combined, ssd_chunked_torch, ssd_ref
from numerics import DEVICE, assert_rule, rel_err, triton_ok

GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def make_inputs(b=2, l=40, h=4, p=8, g=1, n=8, dtype=torch.float64, device="cpu", D_hdim=False, z=True,
                init=True, dt_bias=True):
    """Random SSD inputs (dict of leaf tensors). A is fp32-style negative, dt pre-softplus around 0."""
    t = dict(
        x=torch.randn(b, l, h, p, dtype=dtype, device=device),
        dt=torch.randn(b, l, h, dtype=dtype, device=device) - 1.0,
        A=-torch.rand(h, dtype=torch.float64, device=device).add(0.5),
        B=torch.randn(b, l, g, n, dtype=dtype, device=device),
        C=torch.randn(b, l, g, n, dtype=dtype, device=device),
        D=torch.randn((h, p) if D_hdim else (h,), dtype=torch.float64, device=device),
    )
    if z:
        t["z"] = torch.randn(b, l, h, p, dtype=dtype, device=device)
    if dt_bias:
        t["dt_bias"] = torch.randn(h, dtype=torch.float64, device=device) * 0.5
    if init:
        t["initial_states"] = torch.randn(b, h, p, n, dtype=torch.float64, device=device)
    return t


def cast(t, dtype, low=("x", "dt", "B", "C", "z"), requires_grad=True):
    """Copy the inputs: activations in ``dtype``, parameters (A, D, dt_bias, initial_states) in fp32 (float64
    when dtype is float64), as the official op expects."""
    param = torch.float64 if dtype == torch.float64 else torch.float32
    return {k: v.detach().to(dtype if k in low else param).requires_grad_(requires_grad) for k, v in t.items()}


def run(fn, t, chunk_size=16, grads=True, **options):
    """Call ``fn`` with the inputs; return out, final states and the gradients of a random loss."""
    out, final = fn(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size, D=t.get("D"), z=t.get("z"),
                    dt_bias=t.get("dt_bias"), initial_states=t.get("initial_states"), return_final_states=True,
                    **options)
    res = {"out": out, "final": final}
    if grads:
        g = torch.Generator().manual_seed(1)
        w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
        w_fin = torch.randn(final.shape, generator=g, dtype=torch.float64).to(final)
        loss = (out * w_out).sum() + (final * w_fin).sum()
        leaves = [t[k] for k in GRAD_NAMES if k in t]
        for k, gr in zip([k for k in GRAD_NAMES if k in t], torch.autograd.grad(loss, leaves)):
            res["d" + k] = gr
    return res


# ---------------------------------------------------------------- the PyTorch path against the reference


@pytest.mark.parametrize("l", [1, 63, 100, 257])
def test_torch_path_matches_reference(l):
    t = make_inputs(b=2, l=l, h=4, p=4, g=2, n=6)
    opts = dict(dt_softplus=True)
    ref = run(ssd_ref, cast(t, torch.float64), **opts)
    got = run(ssd_chunked_torch, cast(t, torch.float64), chunk_size=32, **opts)
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-10, k


@pytest.mark.parametrize("g", [1, 2, 8])
@pytest.mark.parametrize("D_hdim", [False, True])
def test_torch_path_groups_D_limit(g, D_hdim):
    t = make_inputs(b=1, l=45, h=8, p=4, g=g, n=4, D_hdim=D_hdim)
    opts = dict(dt_softplus=True, dt_limit=(0.05, 0.6))
    ref = run(ssd_ref, cast(t, torch.float64), **opts)
    got = run(ssd_chunked_torch, cast(t, torch.float64), chunk_size=16, **opts)
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-10, k


def test_torch_path_no_options_fp32():
    t = make_inputs(b=2, l=70, z=False, init=False, dt_bias=False)
    del t["D"]
    t["dt"] = t["dt"].abs() * 0.3  # no softplus: dt used as given
    ref = run(ssd_ref, cast(t, torch.float64))
    got = run(ssd_chunked_torch, cast(t, torch.float32))
    assert got["out"].dtype == torch.float32 and got["final"].dtype == torch.float32
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-5, k


def test_torch_path_low_precision_dtype():
    t = cast(make_inputs(l=50), torch.bfloat16, requires_grad=False)
    out, final = ssd_chunked_torch(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D"], z=t["z"],
                                   dt_bias=t["dt_bias"], initial_states=t["initial_states"], dt_softplus=True,
                                   return_final_states=True)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32


def packed_inputs(lengths, h=4, p=4, g=2, n=6):
    t = make_inputs(b=1, l=sum(lengths), h=h, p=p, g=g, n=n)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))[None]
    return t, cu, seq_idx


def separate_runs(fn, t, cu, chunk_size):
    """Each packed sequence on its own (the first keeps the initial state): outputs and final states."""
    outs, finals = [], []
    for i in range(len(cu) - 1):
        s, e = int(cu[i]), int(cu[i + 1])
        piece = {k: (v[:, s:e] if v.dim() >= 3 and k != "initial_states" else v) for k, v in t.items()}
        if i > 0:
            piece["initial_states"] = torch.zeros_like(t["initial_states"])
        r = run(fn, piece, chunk_size=chunk_size, grads=False, dt_softplus=True)
        outs.append(r["out"])
        finals.append(r["final"][0])
    return torch.cat(outs, dim=1), torch.stack(finals)


@pytest.mark.parametrize("fn", [ssd_ref, ssd_chunked_torch])
def test_packed_sequences_equal_separate_runs(fn):
    t, cu, seq_idx = packed_inputs([5, 40, 1, 33, 17])
    t = cast(t, torch.float64, requires_grad=False)
    want_out, want_states = separate_runs(ssd_ref, t, cu, 16)
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], 16)
    kw = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], initial_states=t["initial_states"], dt_softplus=True)
    out = fn(*args, seq_idx=seq_idx, **kw)
    assert rel_err(out, want_out) < 1e-10
    out2, final, varlen = fn(*args, cu_seqlens=cu, return_final_states=True, return_varlen_states=True, **kw)
    assert rel_err(out2, want_out) < 1e-10
    assert rel_err(varlen, want_states) < 1e-10
    assert rel_err(final[0], want_states[-1]) < 1e-10


def test_two_halves_carrying_state_equal_one_pass():
    t = cast(make_inputs(b=2, l=90), torch.float64, requires_grad=False)
    kw = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True, return_final_states=True)
    full, final = ssd_chunked_torch(t["x"], t["dt"], t["A"], t["B"], t["C"], 32,
                                    initial_states=t["initial_states"], **kw)
    h = 37
    first = {k: t[k][:, :h] for k in ("x", "dt", "B", "C")}
    second = {k: t[k][:, h:] for k in ("x", "dt", "B", "C")}
    kw1 = dict(kw, z=t["z"][:, :h])
    kw2 = dict(kw, z=t["z"][:, h:])
    y1, s1 = ssd_chunked_torch(first["x"], first["dt"], t["A"], first["B"], first["C"], 32,
                               initial_states=t["initial_states"], **kw1)
    y2, s2 = ssd_chunked_torch(second["x"], second["dt"], t["A"], second["B"], second["C"], 32,
                               initial_states=s1, **kw2)
    assert rel_err(torch.cat([y1, y2], 1), full) < 1e-12
    assert rel_err(s2, final) < 1e-12


def test_public_op_uses_torch_path_on_cpu():
    t = cast(make_inputs(l=20), torch.float32, requires_grad=False)
    with backend("torch"):
        out = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, D=t["D"], dt_softplus=True)
    want = ssd_chunked_torch(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, D=t["D"], dt_softplus=True)
    assert torch.equal(out, want)


def test_non_contiguous_inputs():
    t = cast(make_inputs(l=30), torch.float64, requires_grad=False)
    x_nc = t["x"].transpose(2, 3).contiguous().transpose(2, 3)
    B_nc = torch.cat([t["B"], t["B"]], dim=-1)[..., : t["B"].shape[-1]]
    a = ssd_chunked_torch(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D"])
    b = ssd_chunked_torch(x_nc, t["dt"], t["A"], B_nc, t["C"], 16, D=t["D"])
    assert rel_err(a, b) < 1e-14


# ---------------------------------------------------------------- Triton kernels (interpreter on CPU)

needs_triton = pytest.mark.skipif(not triton_ok or (DEVICE == "cpu" and not interpreting()),
                                  reason="needs Triton on a GPU, or TRITON_INTERPRET=1")
# interpreter runs are slow: tiny shapes on CPU (several chunks, a partial last one), real ones on a GPU
SHAPE = dict(b=2, l=40, h=4, p=8, n=8) if DEVICE == "cpu" else dict(b=2, l=1000, h=8, p=64, n=128)
CHUNK = 16 if DEVICE == "cpu" else 64
# Triton 3.9's interpreter computes tl.dot on bf16 operands wrongly (fp16 is fine), so CPU CI checks fp16
LOW = torch.float16 if DEVICE == "cpu" else torch.bfloat16


@contextlib.contextmanager
def poisoned_allocations():
    """Every buffer the kernels' launchers allocate starts as NaN: an element a kernel forgets shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kw):
        t = empty(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kw):
        t = empty_like(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty, torch.empty_like = nan_empty, nan_empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def run_triton(t, chunk_size, grads=True, **options):
    with backend("triton"), poisoned_allocations():
        return run(mamba_chunk_scan_combined, t, chunk_size=chunk_size, grads=grads, **options)


def check_kernel(t, dtype, chunk_size=CHUNK, **options):
    """Kernel vs float64 torch path (itself checked against ssd_ref above) under the tolerance rule, with the
    torch path on the same low-precision inputs as the baseline."""
    ref = run(ssd_chunked_torch, cast(t, torch.float64), chunk_size=chunk_size, **options)
    base = run(ssd_chunked_torch, cast(t, dtype), chunk_size=chunk_size, **options)
    kern = run_triton(cast(t, dtype), chunk_size, **options)
    for k in ref:
        assert kern[k].dtype == base[k].dtype, k
        assert_rule(k, kern[k], base[k], ref[k], atol=1e-5 if dtype == torch.float32 else 2e-3)


def on_device(t):
    return {k: v.to(DEVICE) for k, v in t.items()}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, LOW])
def test_triton_matches_reference(dtype):
    t = on_device(make_inputs(**SHAPE, g=2, D_hdim=dtype == torch.float32))
    check_kernel(t, dtype, dt_softplus=True, dt_limit=(0.01, 2.0))


@needs_triton
def test_triton_packed_sequences_initial_state_groups():
    t = on_device(make_inputs(**SHAPE, g=SHAPE["h"]))
    seq_idx = torch.zeros(SHAPE["b"], SHAPE["l"], dtype=torch.int32, device=DEVICE)
    seq_idx[:, CHUNK:] = 1  # a boundary exactly at a chunk start ...
    seq_idx[0, CHUNK + 5:] = 2  # ... and inside chunks
    seq_idx[1, 2 * CHUNK + 3:] = 3
    check_kernel(t, torch.float32, seq_idx=seq_idx, dt_softplus=True)


@needs_triton
@pytest.mark.parametrize("l", [1, 17])
def test_triton_short_no_options(l):
    t = on_device(make_inputs(**dict(SHAPE, l=l), z=False, init=False, dt_bias=False))
    del t["D"]
    t["dt"] = t["dt"].abs() * 0.5
    check_kernel(t, torch.float32)


@needs_triton
def test_triton_varlen_states_and_strides():
    t, cu, _ = packed_inputs([7, 20, 1, 12], h=SHAPE["h"], p=SHAPE["p"], g=2, n=SHAPE["n"])
    t = on_device(cast(t, torch.float32, requires_grad=False))
    cu = cu.to(DEVICE)
    x_strided = t["x"].transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    kw = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], initial_states=t["initial_states"], dt_softplus=True,
              cu_seqlens=cu, return_final_states=True, return_varlen_states=True)
    want = ssd_chunked_torch(t["x"], t["dt"], t["A"], t["B"], t["C"], CHUNK, **kw)
    with backend("triton"), poisoned_allocations():
        got = mamba_chunk_scan_combined(x_strided, t["dt"], t["A"], t["B"], t["C"], CHUNK, **kw)
    for name, g, w in zip(("out", "final", "varlen"), got, want):
        assert rel_err(g, w) < 1e-5, name


@needs_triton
def test_triton_rejects_unsupported_shapes_and_public_op_falls_back():
    t = on_device(cast(make_inputs(b=1, l=4, h=2, p=4, n=300), torch.float32, requires_grad=False))
    from mambakit.ops.ssd.triton_path import ssd_chunked_triton
    with pytest.raises(ValueError, match="dstate <= 256"):
        ssd_chunked_triton(t["x"], t["dt"], t["A"], t["B"], t["C"], 16)
    with backend("triton"):  # a valid input the kernels do not take runs on the PyTorch path
        out = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 16)
    assert torch.equal(out, ssd_chunked_torch(t["x"], t["dt"], t["A"], t["B"], t["C"], 16))


# ---------------------------------------------------------------- bad inputs


def _bad(**over):
    t = cast(make_inputs(b=2, l=10, h=4, p=4, g=2, n=4), torch.float32, requires_grad=False)
    args = dict(x=t["x"], dt=t["dt"], A=t["A"], B=t["B"], C=t["C"], chunk_size=8)
    args.update(over)
    return args


@pytest.mark.parametrize("fn", [ssd_chunked_torch, mamba_chunk_scan_combined, ssd_ref])
@pytest.mark.parametrize("case, match", [
    (lambda: _bad(x=torch.randn(2, 10, 4)), "x must have 4 dimensions"),
    (lambda: _bad(dt=torch.randn(2, 10, 3)), "dt has shape"),
    (lambda: _bad(A=torch.randn(3)), "A has shape"),
    (lambda: _bad(B=torch.randn(2, 10, 3, 4), C=torch.randn(2, 10, 3, 4)), "ngroups=3"),
    (lambda: _bad(C=torch.randn(2, 10, 2, 5)), "C has shape"),
    (lambda: _bad(chunk_size=0), "chunk_size must be a positive int"),
    (lambda: _bad(D=torch.randn(4, 3)), "D has shape"),
    (lambda: _bad(initial_states=torch.randn(2, 4, 4, 5)), "initial_states has shape"),
    (lambda: _bad(seq_idx=torch.tensor([[0, 1, 0, 1, 1, 1, 1, 1, 1, 1]] * 2)), "non-decreasing"),
    (lambda: _bad(cu_seqlens=torch.tensor([0, 4, 10])), "batch 1"),
    (lambda: _bad(return_varlen_states=True), "needs cu_seqlens"),
    (lambda: _bad(dt_limit=(1.0, 0.5)), "dt_limit"),
])
def test_bad_inputs_raise(fn, case, match):
    with backend("torch"), pytest.raises(ValueError, match=match):
        fn(**case())


@needs_triton
def test_measured_tiles_apply_only_where_measured():
    """The H200-tuned tiles are used for 16-bit inputs at headdim <= 64, dstate <= 128, chunk % 128 == 0;
    a caller's blocks win; other shapes keep the general defaults."""
    from mambakit.ops.ssd.chunk_scan import _TUNED_16BIT, _with_tuned

    assert _with_tuned("dbc", None, 256, 64, 128, torch.bfloat16) == _TUNED_16BIT["dbc"]
    assert _with_tuned("fwd", {"BLOCK_M": 64}, 256, 64, 128, torch.float16)["BLOCK_M"] == 64
    for Q, p, n, dtype in ((256, 64, 128, torch.float32), (64, 64, 128, torch.bfloat16),
                           (256, 128, 128, torch.bfloat16), (256, 64, 256, torch.bfloat16)):
        assert _with_tuned("dx", None, Q, p, n, dtype) == {}


# ---------------------------------------------------------------- time-split state kernels (long sequences)


def state_blocks(**blk):
    """Override the state kernels' plan (e.g. TIME_SPLIT=parts) for the calls inside the block."""
    from mambakit.ops.ssd import triton_path

    return triton_path.overridden_blocks(("state_fwd", "state_bwd"), **blk)


# the split tests run the kernels more often: fewer heads and batch rows than SHAPE on the interpreter
SPLIT_SHAPE = dict(SHAPE, b=1, h=2) if DEVICE == "cpu" else SHAPE


def slow_decay_inputs(l, g, **kw):
    """Inputs whose state survives many chunks (dt ~ 0.02, |A| ~ 1), so that a wrong time-split correction
    shows up (with the usual dt the carried state vanishes within a chunk or two)."""
    t = make_inputs(**dict(SPLIT_SHAPE, l=l), g=g, **kw)
    t["dt"] = t["dt"] - 3.0
    return on_device(t)


def test_state_plan_time_split_only_for_small_grids(monkeypatch):
    """Grids that fill the GPU keep the former tiles; a small grid over many chunks is split in time; forced
    unsplit, a long sequence on a small grid gets the shrunken dstate block with the measured 3 stages (16-bit),
    a short one the former plan."""
    pytest.importorskip("triton")
    from mambakit.ops.ssd import state_passing as sp

    monkeypatch.setattr(sp, "num_sms", lambda device: 132)  # H100/H200
    plan = lambda b, l, h, dtype=torch.bfloat16, **blk: sp.state_plan(256, b, h, 64, 128, -(-l // 256), blk, dtype,
                                                                      torch.device("cpu"))
    # unsplit; BLOCK_K 128 (the backward only above 4 programs an SM) and 3 forward stages above 4 programs an SM
    for b, l, h, stages, bwd_k in ((4, 4096, 48, 2, 64), (8, 2048, 80, 3, 128), (16, 512, 24, 3, 128)):
        got = plan(b, l, h)
        assert (got["parts"], got["BLOCK_N"], got["BLOCK_K"], got["num_stages"]) == (1, 64, 128, stages)
        bwd = sp.state_plan(256, b, h, 64, 128, -(-l // 256), {}, torch.bfloat16, torch.device("cpu"), stage="bwd")
        assert (bwd["BLOCK_K"], bwd["num_stages"]) == (bwd_k, 2)
    assert plan(8, 2048, 80, torch.float32)["BLOCK_K"] == 32  # fp32 and other shapes: the former tiles
    assert sp.state_plan(256, 8, 80, 128, 128, 8, {}, torch.bfloat16, torch.device("cpu"))["BLOCK_K"] == 64
    assert plan(8, 2048, 80, BLOCK_K=64, num_stages=2)["BLOCK_K"] == 64
    long = plan(1, 65536, 48)
    assert long["parts"] == 8 and long["chunks_per_part"] == 32 and long["BLOCK_N"] == 64
    assert (long["BLOCK_K"], long["num_stages"]) == (128, 3)
    assert plan(1, 65536, 48, TIME_SPLIT=3)["parts"] == 3
    off = plan(1, 65536, 48, TIME_SPLIT=1)
    assert (off["parts"], off["BLOCK_N"], off["BLOCK_K"], off["num_stages"]) == (1, 32, 64, 3)
    assert plan(1, 65536, 48, torch.float32, TIME_SPLIT=1)["num_stages"] == 2
    short = plan(1, 1024, 48)  # 4 chunks: too short to split, and the former plan
    assert (short["parts"], short["BLOCK_N"], short["num_stages"]) == (1, 32, 2)
    assert plan(1, 65536, 48, TIME_SPLIT=1000)["parts"] == 256  # at most one part per chunk


@needs_triton
@pytest.mark.parametrize("g, dtype, with_seq", [(1, torch.float32, True), (2, torch.float32, False),
                                                (2, LOW, True)])
def test_triton_time_split_matches_reference(g, dtype, with_seq):
    """Forced 3-part split over 7 chunks (3 + 3 + 1, partial last chunk): outputs, final state and every
    gradient under the tolerance rule, and equal to the unsplit kernels up to rounding."""
    l = 6 * CHUNK + CHUNK // 2 + 3
    t = slow_decay_inputs(l, g, D_hdim=g == 2)
    opts = dict(dt_softplus=True)
    if with_seq:
        seq_idx = torch.zeros(SPLIT_SHAPE["b"], l, dtype=torch.int32, device=DEVICE)
        seq_idx[:, 3 * CHUNK:] = 1  # at a part boundary ...
        seq_idx[:, 4 * CHUNK + 5:] = 2  # ... inside a part's chunk ...
        seq_idx[:, 6 * CHUNK + 2:] = 3  # ... and in the last part
        opts["seq_idx"] = seq_idx
    ref = run(ssd_chunked_torch, cast(t, torch.float64), chunk_size=CHUNK, **opts)
    base = run(ssd_chunked_torch, cast(t, dtype), chunk_size=CHUNK, **opts)
    with state_blocks(TIME_SPLIT=3):
        split = run_triton(cast(t, dtype), CHUNK, **opts)
    with state_blocks(TIME_SPLIT=1):
        whole = run_triton(cast(t, dtype), CHUNK, **opts)
    for k in ref:
        assert split[k].dtype == base[k].dtype, k
        assert_rule(k, split[k], base[k], ref[k], atol=1e-5 if dtype == torch.float32 else 2e-3)
        assert rel_err(split[k], whole[k]) < (1e-5 if dtype == torch.float32 else 3e-3), k


@needs_triton
def test_triton_time_split_default_plan_no_init_no_final_grad():
    """The default plan splits a small grid over 8+ chunks; without an initial state, and with a loss on the
    outputs only (no d final_states), it equals the unsplit kernels."""
    from mambakit.ops.ssd import state_passing as sp

    l = 8 * CHUNK + 5
    plan = sp.state_plan(CHUNK, SPLIT_SHAPE["b"], SPLIT_SHAPE["h"], SPLIT_SHAPE["p"], SPLIT_SHAPE["n"], 9, {},
                         torch.float32, torch.device(DEVICE))
    assert plan["parts"] > 1
    t = slow_decay_inputs(l, 1, init=False)

    def out_grads():
        leaves = cast(t, torch.float32)
        with backend("triton"), poisoned_allocations():
            out = mamba_chunk_scan_combined(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"],
                                            CHUNK, D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"],
                                            dt_softplus=True)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
        names = [k for k in GRAD_NAMES if k in leaves]
        return [out] + list(torch.autograd.grad((out * w).sum(), [leaves[k] for k in names]))

    split = out_grads()
    with state_blocks(TIME_SPLIT=1):
        whole = out_grads()
    for i, (a, b) in enumerate(zip(split, whole)):
        assert rel_err(a, b) < 1e-5, i


# ---------------------------------------------------------------- dB / dC backward variants


def dbc_blocks(**blk):
    """Run the dB / dC backward with the blocks ``blk`` (VARIANT="summed", tile sizes) inside the block."""
    from mambakit.ops.ssd import triton_path

    return triton_path.overridden_blocks(("scan_bwd_dbc",), **blk)


# chunk 32 with 16-wide tiles on the interpreter: several W tiles per chunk (below, on and above the diagonal)
DBC_CHUNK = 32 if DEVICE == "cpu" else 256
DBC_TILES = dict(BLOCK_W=16, BLOCK_M=16, BLOCK_K=16) if DEVICE == "cpu" else {}


@needs_triton
@pytest.mark.parametrize("g, dtype, with_seq, init", [(1, torch.float32, True, True), (2, torch.float32, False, False),
                                                      (2, LOW, True, True), (1, LOW, False, True)])
def test_triton_dbc_summed_matches_reference(g, dtype, with_seq, init):
    """The "summed" dB / dC backward: outputs, final state and every gradient under the tolerance rule, and
    equal to the "per_head" variant up to rounding (partial last chunk, packed sequences, groups)."""
    l = 2 * DBC_CHUNK + DBC_CHUNK // 2 + 3
    t = on_device(make_inputs(**dict(SPLIT_SHAPE, l=l), g=g, D_hdim=g == 2, init=init))
    opts = dict(dt_softplus=True)
    if with_seq:
        seq_idx = torch.zeros(SPLIT_SHAPE["b"], l, dtype=torch.int32, device=DEVICE)
        seq_idx[:, DBC_CHUNK:] = 1  # at a chunk start ...
        seq_idx[:, DBC_CHUNK + DBC_CHUNK // 2 + 5:] = 2  # ... inside a chunk, in its second tile row
        seq_idx[:, 2 * DBC_CHUNK + 2:] = 3  # ... and in the partial last chunk
        opts["seq_idx"] = seq_idx
    ref = run(ssd_chunked_torch, cast(t, torch.float64), chunk_size=DBC_CHUNK, **opts)
    base = run(ssd_chunked_torch, cast(t, dtype), chunk_size=DBC_CHUNK, **opts)
    with dbc_blocks(VARIANT="summed", **DBC_TILES):
        summed = run_triton(cast(t, dtype), DBC_CHUNK, **opts)
    with dbc_blocks(VARIANT="per_head"):
        per_head = run_triton(cast(t, dtype), DBC_CHUNK, **opts)
    assert set(summed) == set(ref) >= {"dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias"}
    for k in ref:
        assert summed[k].dtype == base[k].dtype, k
        assert_rule(k, summed[k], base[k], ref[k], atol=1e-5 if dtype == torch.float32 else 2e-3)
        assert rel_err(summed[k], per_head[k]) < (1e-5 if dtype == torch.float32 else 3e-3), k


@needs_triton
def test_triton_dbc_summed_stage_outputs_equal_per_head():
    """chunk_scan_bwd_dbc alone: dB, dC and e equal; the row and column sums of M, after adding up each
    variant's partials over the written blocks, equal too. Rectangular pass-2 tiles (BLOCK_M != BLOCK_W)."""
    from mambakit.ops.ssd.chunk_cumsum import chunk_cumsum_fwd
    from mambakit.ops.ssd.chunk_scan import chunk_scan_bwd_dbc
    from mambakit.ops.ssd.state_passing import state_bwd, state_fwd

    Q = DBC_CHUNK
    t = cast(on_device(make_inputs(**dict(SPLIT_SHAPE, l=Q + Q // 2 + 1), g=1)), torch.float32,
             requires_grad=False)
    gen = torch.Generator().manual_seed(3)
    dt_p, dA_cs = chunk_cumsum_fwd(t["dt"], t["A"], t["dt_bias"], True, (0.0, float("inf")), False, Q)
    states, _ = state_fwd(t["x"], t["B"], dt_p, dA_cs, None, None, Q, torch.float32)
    dy = torch.randn(t["x"].shape, generator=gen).to(t["x"])
    dstates, _, _ = state_bwd(dy, t["C"], dA_cs, states, None, None, Q)
    args = (t["x"], t["B"], t["C"], dt_p, dA_cs, states, dstates, dy, None, Q)
    tiles = dict(BLOCK_W=16, BLOCK_M=Q, BLOCK_K=16) if DEVICE == "cpu" else dict(BLOCK_W=64, BLOCK_M=128)
    with poisoned_allocations():
        want = chunk_scan_bwd_dbc(*args, {"VARIANT": "per_head"})
        got = chunk_scan_bwd_dbc(*args, {"VARIANT": "summed", **tiles})
    for i in range(3):
        assert rel_err(got[i], want[i]) < 1e-5, i

    def block_sums(parts, by_target):
        """Add up (b, h, c, nblk, Q) partials over the blocks each row / column was written from."""
        nblk = parts.shape[3]
        q = torch.arange(Q, device=parts.device) // (Q // nblk)
        blk = torch.arange(nblk, device=parts.device)[:, None]
        written = (q[None, :] <= blk) if by_target else (q[None, :] >= blk)
        return torch.where(written, parts, torch.zeros((), device=parts.device)).sum(3)

    assert rel_err(block_sums(got[3], False), want[3]) < 1e-5
    assert rel_err(block_sums(got[4], True), block_sums(want[4], True)) < 1e-5


def test_dbc_variant_name_checked():
    pytest.importorskip("triton")
    from mambakit.ops.ssd.chunk_scan import chunk_scan_bwd_dbc

    x = torch.randn(1, 16, 2, 4)
    with pytest.raises(ValueError, match="VARIANT must be one of"):
        chunk_scan_bwd_dbc(x, None, None, None, None, None, None, None, None, 16, {"VARIANT": "fast"})


# ---------------------------------------------------------------- scan_fwd with two heads a program


@needs_triton
@pytest.mark.parametrize("g, dtype, with_seq, D_hdim", [(1, torch.float32, True, True), (2, LOW, False, False),
                                                        (4, torch.float32, False, False)])
def test_triton_scan_fwd_two_heads_matches_reference(g, dtype, with_seq, D_hdim):
    """scan_fwd HEADS=2 (two heads of a group share the C B^T dot): outputs, final states and every gradient
    under the tolerance rule, and equal to one head a program. g=4 of 4 heads has one head a group, where
    the launcher falls back to one head a program."""
    from mambakit.ops.ssd import triton_path
    from mambakit.ops.ssd.chunk_scan import chunk_scan_fwd

    t = on_device(make_inputs(**SHAPE, g=g, D_hdim=D_hdim))
    opts = dict(dt_softplus=True)
    if with_seq:
        seq_idx = torch.zeros(SHAPE["b"], SHAPE["l"], dtype=torch.int32, device=DEVICE)
        seq_idx[:, CHUNK:] = 1
        seq_idx[0, CHUNK + 5:] = 2
        opts["seq_idx"] = seq_idx
    ref = run(ssd_chunked_torch, cast(t, torch.float64), chunk_size=CHUNK, **opts)
    base = run(ssd_chunked_torch, cast(t, dtype), chunk_size=CHUNK, **opts)
    seen = []
    real = triton_path.chunk_scan_fwd

    def spy(*args, **kw):
        seen.append(dict(args[-1] or {}))
        return real(*args, **kw)

    with triton_path.overridden_blocks(("scan_fwd",), HEADS=2), pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_path, "chunk_scan_fwd", spy)
        two = run_triton(cast(t, dtype), CHUNK, **opts)
    assert seen and all(s.get("HEADS") == 2 for s in seen)
    one = run_triton(cast(t, dtype), CHUNK, **opts)
    for k in ref:
        assert_rule(k, two[k], base[k], ref[k], atol=1e-5 if dtype == torch.float32 else 2e-3)
        assert rel_err(two[k], one[k]) < (1e-6 if dtype == torch.float32 else 1e-3), k
    with pytest.raises(ValueError, match="HEADS"):
        chunk_scan_fwd(*[t[k] for k in ("x", "B", "C")], None, None, None, None, None, None, CHUNK, {"HEADS": 3})
