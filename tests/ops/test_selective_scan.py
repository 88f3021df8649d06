"""selective_scan_fn: the PyTorch path and the Triton kernels against the float64 loop reference."""
import pytest
import torch

from mambakit.ops import selective_scan as ss
from mambakit.ops.dispatch import backend
from mambakit.ops.selective_scan import selective_scan_fn, selective_scan_ref
from numerics import DEVICE, assert_rule, rel_err, triton_ok

F64 = torch.float64
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(b, d, l, n, bc="step", ngroups=2, dtype=F64, device="cpu", options=True):
    """Random inputs as a dict of leaf tensors requiring grad; dt stays O(0.1-1) so states neither die nor blow up."""
    g = torch.Generator().manual_seed(1234 + l)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift).to(device)

    x = {"u": r(b, d, l), "delta": r(b, d, l, scale=0.5, shift=-1.0),
         "A": -torch.exp(r(d, n, scale=0.5)).to(device)}
    shape = {"const": (d, n), "step": (b, n, l), "group": (b, ngroups, n, l)}[bc]
    x["B"], x["C"] = r(*shape), r(*shape)
    if options:
        x.update(D=r(d), z=r(b, d, l), delta_bias=r(d, scale=0.3), initial_state=r(b, d, n))
    out = {}
    for k, t in x.items():
        t = t.to(dtype if k not in ("A", "D", "delta_bias", "initial_state") else torch.float32 if dtype != F64 else F64)
        out[k] = t.detach().requires_grad_()
    return out


def run(fn, x, seq_idx=None, softplus=True):
    kw = {k: v for k, v in x.items() if k not in ("u", "delta", "A", "B", "C")}
    return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus=softplus, return_last_state=True,
              seq_idx=seq_idx, **kw)


def outputs_and_grads(fn, x, seq_idx=None, softplus=True, seed=0):
    """(out, last_state, grads of every input) for a random linear loss on out and last_state."""
    out, last = run(fn, x, seq_idx, softplus)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, generator=g, dtype=F64).to(out.device, out.dtype)
    glast = torch.randn(last.shape, generator=g, dtype=F64).to(last.device, last.dtype)
    loss = (out * gout).sum() + (last * glast).sum()
    names = [k for k in ARGS if k in x]
    grads = torch.autograd.grad(loss, [x[k] for k in names], allow_unused=True)
    return out, last, dict(zip(names, grads))


def assert_close_all(got, ref, tol, what="", atol=0.0):
    """Relative L2 error <= tol for out, last state and every gradient; with atol, ||got - ref|| <= tol ||ref||
    + atol instead, for references that can be exactly zero (dA at length 1 without an initial state: dA
    multiplies a zero state) where any rounding in the kernel is an infinite relative error."""
    (o1, s1, g1), (o2, s2, g2) = got, ref
    pairs = {"out": (o1, o2), "last_state": (s1, s2)}
    pairs.update({f"d{k}": (g1[k], g2[k]) for k in g2})
    bad = {}
    for k, (a, b) in pairs.items():
        e = rel_err(a, b)
        floor = atol / max(float(b.detach().double().norm()), 1e-30)  # atol as a relative error
        if not e <= tol + floor:
            bad[k] = f"{e:.1e}"
    assert not bad, f"{what} rel err above {tol} (atol {atol}): {bad}"


@pytest.fixture
def small_chunks(monkeypatch):
    """Make the PyTorch path use 16-step chunks at the test sizes, so that chunk boundaries are exercised."""
    monkeypatch.setattr(ss, "_TORCH_CHUNK_ELEMS", 2 * 8 * 4 * 16)
    monkeypatch.setattr(ss, "_TORCH_CHUNK_ELEMS_CUDA", 2 * 8 * 4 * 16)


# ---------------------------------------------------------------------------------------------- PyTorch path

@pytest.mark.parametrize("bc", ["const", "step", "group"])
@pytest.mark.parametrize("l", [1, 63, 100, 300])
def test_torch_matches_reference(small_chunks, bc, l):
    x = make_inputs(2, 8, l, 4, bc)
    with backend("torch"):
        got = outputs_and_grads(selective_scan_fn, x)
    assert_close_all(got, outputs_and_grads(selective_scan_ref, x), 1e-12, f"torch path {bc} l={l}")


def test_torch_without_options(small_chunks):
    x = make_inputs(2, 8, 40, 4, "step", options=False)
    with backend("torch"):
        got = outputs_and_grads(selective_scan_fn, x, softplus=False)
    assert_close_all(got, outputs_and_grads(selective_scan_ref, x, softplus=False), 1e-12, "no options")
    out = selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"])  # no last state: a plain tensor
    assert torch.is_tensor(out) and out.shape == x["u"].shape


def test_torch_float32_and_bfloat16_close_to_float64(small_chunks):
    x64 = make_inputs(2, 8, 63, 4, "group")
    ref = outputs_and_grads(selective_scan_ref, x64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        x = {k: v.detach().to(dtype if v.dtype == F64 and k in ("u", "delta", "B", "C", "z") else torch.float32)
             .requires_grad_() for k, v in x64.items()}
        with backend("torch"):
            out, last, grads = outputs_and_grads(selective_scan_fn, x)
        assert out.dtype == dtype and last.dtype == torch.float32
        assert all(grads[k].dtype == x[k].dtype for k in grads)
        assert_close_all((out, last, grads), ref, tol, f"torch path {dtype}")


def packed_inputs(bc, lens=(7, 20, 13)):
    """One row of packed sequences plus the seq_idx that separates them."""
    x = make_inputs(1, 8, sum(lens), 4, bc)
    x["initial_state"] = x["initial_state"].detach().requires_grad_()
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lens)])[None]
    return x, seq_idx, lens


def split_time(x, s0, s1):
    """The inputs of positions s0:s1 (B/C per step sliced, constant ones kept)."""
    y = dict(x)
    for k in ("u", "delta", "z"):
        y[k] = x[k][..., s0:s1]
    if x["B"].dim() > 2:
        y["B"], y["C"] = x["B"][..., s0:s1], x["C"][..., s0:s1]
    return y


def check_packed_equals_separate(fn, bc, tol):
    x, seq_idx, lens = packed_inputs(bc)
    out, last = run(fn, x, seq_idx)
    s0 = 0
    for i, n in enumerate(lens):
        y = split_time(x, s0, s0 + n)
        if i > 0:  # the initial state belongs to the first packed sequence only
            y["initial_state"] = torch.zeros_like(x["initial_state"])
        o, h = run(fn, y)
        assert rel_err(out[..., s0:s0 + n], o) <= tol, f"packed sequence {i} differs"
        s0 += n
    assert rel_err(last, h) <= tol
    # Gradients: the packed loss is the sum of the separate losses.
    (g_packed,) = torch.autograd.grad((out * out).sum(), [x["delta"]])
    assert torch.isfinite(g_packed).all()


@pytest.mark.parametrize("bc", ["const", "step", "group"])
def test_torch_seq_idx_packed_equals_separate(small_chunks, bc):
    with backend("torch"):
        check_packed_equals_separate(selective_scan_fn, bc, 1e-12)
    x, seq_idx, _ = packed_inputs(bc)
    with backend("torch"):
        got = outputs_and_grads(selective_scan_fn, x, seq_idx)
    assert_close_all(got, outputs_and_grads(selective_scan_ref, x, seq_idx), 1e-12, "seq_idx grads")


def check_prefix_continuation(fn, tol, l=50, cut=22, device="cpu"):
    x = make_inputs(2, 8, l, 4, "group", device=device)
    out, last = run(fn, x)
    first = split_time(x, 0, cut)
    o1, h1 = run(fn, first)
    second = split_time(x, cut, l)
    second["initial_state"] = h1
    o2, h2 = run(fn, second)
    assert rel_err(torch.cat([o1, o2], -1), out) <= tol
    assert rel_err(h2, last) <= tol


def test_torch_initial_state_continues_a_prefix(small_chunks):
    with backend("torch"):
        check_prefix_continuation(selective_scan_fn, 1e-12)


def test_torch_non_contiguous_inputs(small_chunks):
    x = make_inputs(2, 8, 30, 4, "step")
    ref = outputs_and_grads(selective_scan_ref, x)
    # channels-last (b, l, d) memory, like the Mamba module's views of in_proj's output
    y = {k: (v.detach().transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() == 3 else v.detach())
         .requires_grad_() for k, v in x.items()}
    with backend("torch"):
        got = outputs_and_grads(selective_scan_fn, y)
    assert_close_all(got, ref, 1e-12, "non-contiguous")


def test_torch_gradcheck():
    x = make_inputs(1, 4, 5, 2, "group", ngroups=2)
    names = list(x)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1]])

    def f(*args):
        kw = dict(zip(names, args))
        return run(selective_scan_fn, kw, seq_idx)

    with backend("torch"):
        assert torch.autograd.gradcheck(f, [x[k] for k in names], fast_mode=True)


BAD = [
    (dict(u=torch.randn(2, 8)), "u must have 3 dimensions"),
    (dict(delta=torch.randn(2, 8, 9)), "delta has shape"),
    (dict(A=torch.randn(7, 4)), "A has shape"),
    (dict(B=torch.randn(2, 4, 9)), "B has shape"),
    (dict(B=torch.randn(2, 3, 4, 10), C=torch.randn(2, 3, 4, 10)), "divisible by ngroups"),
    (dict(C=torch.randn(8, 4)), "same layout"),
    (dict(D=torch.randn(7)), "D has shape"),
    (dict(initial_state=torch.randn(2, 8, 5)), "initial_state has shape"),
    (dict(seq_idx=torch.tensor([[0, 1] * 5, [0] * 10])), "non-decreasing"),
    (dict(seq_idx=torch.zeros(2, 10)), "int32 or int64"),
    (dict(u=torch.randint(0, 3, (2, 8, 10))), "floating-point"),
]


@pytest.mark.parametrize("bad,msg", BAD)
def test_bad_inputs_raise(bad, msg):
    x = dict(u=torch.randn(2, 8, 10), delta=torch.randn(2, 8, 10), A=-torch.rand(8, 4), B=torch.randn(2, 4, 10),
             C=torch.randn(2, 4, 10))
    x.update(bad)
    with pytest.raises(ValueError, match=msg):
        selective_scan_fn(**x)


# ---------------------------------------------------------------------------------------------- Triton kernels
# On CPU they run in Triton's interpreter, whose generic scan is a Python loop per element: tiny shapes only.

needs_triton = pytest.mark.skipif(not triton_ok, reason="triton not installed")
ON_GPU = DEVICE == "cuda"
TRITON_SHAPE = dict(b=2, d=64, l=300, n=16) if ON_GPU else dict(b=2, d=8, l=28, n=4)


@pytest.fixture
def poisoned(monkeypatch):
    """Small blocks (several chunks and channel blocks at the test sizes) and NaN-filled kernel outputs."""
    from mambakit.ops import _triton_scan_time as tk
    from mambakit.ops import _triton_selective_scan as k
    from numerics import poison_

    monkeypatch.setitem(k.FWD_CONFIG, "chunk", 8)
    monkeypatch.setitem(k.FWD_CONFIG, "seg", 16)
    monkeypatch.setitem(k.FWD_CONFIG, "block_d", 4)
    monkeypatch.setitem(k.BWD_CONFIG, "chunk", 4)
    monkeypatch.setitem(k.BWD_CONFIG, "block_d", 4)
    monkeypatch.setitem(tk.FWD_TIME_CONFIG, "chunk", 16)  # the time-parallel forward: several chunks too
    monkeypatch.setitem(tk.FWD_TIME_CONFIG, "rows", 2)  # (T, K) kernel: 2 rows of 8 steps
    from mambakit.ops import _triton_scan_time_bwd as tb

    monkeypatch.setitem(tb.BWD_TIME_CONFIG, "chunk", None)  # the backward in chunks of the forward's 16
    monkeypatch.setattr(k, "_empty", lambda *a, **kw: poison_(torch.empty(*a, **kw)))
    monkeypatch.setattr(k, "_empty_like", lambda *a, **kw: poison_(torch.empty_like(*a, **kw)))


def cast_inputs(x64, dtype, channels_last=False):
    """Leaf copies: u, delta, z, B, C in dtype (optionally (b, l, d) memory), the parameters in float32."""
    out = {}
    for k, v in x64.items():
        v = v.detach().to(dtype if k in ("u", "delta", "z", "B", "C") else torch.float32)
        if channels_last and v.dim() == 3 and k != "initial_state":
            v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
        out[k] = v.requires_grad_()
    return out


def check_kernel_rule(bc, dtype, seq_idx=None, channels_last=False, atol=1e-5, **shape):
    """Triton output, last state and every gradient obey the tolerance rule against the float64 reference."""
    shape = shape or TRITON_SHAPE
    x64 = make_inputs(shape["b"], shape["d"], shape["l"], shape["n"], bc, device=DEVICE)
    ref = outputs_and_grads(selective_scan_ref, x64, seq_idx)
    with backend("torch"):
        base = outputs_and_grads(selective_scan_fn, cast_inputs(x64, dtype), seq_idx)
    with backend("triton"):
        got = outputs_and_grads(selective_scan_fn, cast_inputs(x64, dtype, channels_last), seq_idx)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_rule("out", got[0], base[0], ref[0], atol=atol)
    assert_rule("last_state", got[1], base[1], ref[1], atol=atol)
    for k in ref[2]:
        assert got[2][k].dtype == base[2][k].dtype, k
        assert_rule(f"d{k}", got[2][k], base[2][k], ref[2][k], atol=atol)


def seq_idx_for(b, l):
    """Row 0: three packed sequences; row 1: one."""
    s = torch.zeros(b, l, dtype=torch.int64)
    s[0, l // 4:] = 1
    s[0, l // 2 + 3:] = 2
    return s.to(DEVICE)


@needs_triton
@pytest.mark.parametrize("kernel", ["channel", "time"])  # forward and backward kernels (contiguous: both run)
@pytest.mark.parametrize("bc,nk", [("const", 1), ("step", 2), ("group", 4)])  # nk: states per thread
def test_triton_fp32_all_options(poisoned, monkeypatch, bc, nk, kernel):
    from mambakit.ops import _triton_selective_scan as k

    monkeypatch.setitem(k.FWD_CONFIG, "kernel", kernel)
    monkeypatch.setitem(k.BWD_CONFIG, "kernel", kernel)
    monkeypatch.setitem(k.FWD_CONFIG, "nk", nk)
    monkeypatch.setitem(k.BWD_CONFIG, "nk", nk)
    check_kernel_rule(bc, torch.float32, seq_idx=seq_idx_for(TRITON_SHAPE["b"], TRITON_SHAPE["l"]))


@needs_triton
def test_triton_bf16_channels_last(poisoned):
    shape = dict(TRITON_SHAPE, l=TRITON_SHAPE["l"] if ON_GPU else 20)
    check_kernel_rule("step", torch.bfloat16, channels_last=True, atol=1e-3, **shape)


@needs_triton
def test_triton_length_one_and_no_options(poisoned):
    x64 = make_inputs(2, 8, 1, 4, "step", device=DEVICE)
    check_kernel_rule("group", torch.float32, b=1, d=8, l=1, n=4)
    x = cast_inputs({k: x64[k] for k in ("u", "delta", "A", "B", "C")}, torch.float32)
    with backend("triton"):
        got = outputs_and_grads(selective_scan_fn, x, softplus=False)
    ref = outputs_and_grads(selective_scan_ref, {k: x64[k] for k in x}, softplus=False)
    # The reference dA is exactly 0 here (one step from a zero state); on a GPU the kernel's is its rounding
    # error (FMA contraction of g (h - dt u B) leaves dt u B's rounding, ~1e-7), so an absolute floor. A wrong
    # or missing dA (O(1), NaN) still fails.
    assert float(ref[2]["A"].abs().max()) == 0.0
    assert_close_all(got, ref, 1e-5, "triton without options", atol=1e-5)


@needs_triton
def test_triton_prefix_continuation(poisoned):
    with backend("triton"):
        check_prefix_continuation(selective_scan_fn, 1e-5, l=24, cut=9, device=DEVICE)


@needs_triton
def test_auto_tiles_follow_the_grid_size():
    """Wide tiles (4 states a thread) when every SM gets two programs, narrow ones (more programs) otherwise;
    tiles a caller set are kept."""
    from mambakit.ops import _triton_selective_scan as k

    wide, narrow = torch.empty(4, 3072, 1), torch.empty(1, 3072, 1)  # 384 and 96 programs of 32 channels
    assert k._auto_tiles(dict(k.FWD_CONFIG), wide, k._NARROW_FWD)["nk"] == 4
    cfg = k._auto_tiles(dict(k.FWD_CONFIG, parts=1), narrow, k._NARROW_FWD)  # no time split: narrow tiles
    assert (cfg["block_d"], cfg["nk"], cfg["chunk"], cfg["seg"]) == (4, 1, 16, 128)
    assert k._auto_tiles(dict(k.FWD_CONFIG, nk=2), wide, k._NARROW_FWD)["nk"] == 2
    # the default automatic split: wide tiles and enough parts on the small grid, none on the large one
    assert k._auto_tiles(dict(k.FWD_CONFIG), narrow, k._NARROW_FWD)["nk"] == 4
    assert k._time_split(dict(k.FWD_CONFIG), torch.empty(1, 3072, 65536), 32, 128) == (32, 2048)
    assert k._time_split(dict(k.FWD_CONFIG), torch.empty(4, 3072, 4096), 32, 128) == (1, 4096)


# ------------------------------------------------------------- Triton variants: prefetch, time split, cl_copy

def split_seq_idx(b, l):
    """Row 0: packed sequences starting at step 8 (a part boundary of the 8-step parts below) and at 19 (inside
    a part); row 1: one starting at 13."""
    s = torch.zeros(b, l, dtype=torch.int64)
    s[0, 8:] = 1
    s[0, 19:] = 2
    s[1:, 13:] = 1
    return s.to(DEVICE)


VARIANTS = [  # (B/C layout, dtype, channels-last inputs, forward config, backward config)
    ("group", torch.float32, False, dict(kernel="channel", parts=3, prefetch=True), dict(kernel="channel", parts=4)),
    ("const", torch.float32, False, dict(kernel="channel", prefetch=2, parts=1), dict(kernel="channel", parts=2)),
    ("step", torch.bfloat16, True, dict(kernel="channel", parts=0, part_programs=4, cl_copy=True, prefetch=True),
     dict(kernel="channel", parts=0, part_programs=4, cl_copy=True)),
]


@needs_triton
@pytest.mark.parametrize("bc,dtype,cl,fwd,bwd", VARIANTS)
def test_triton_variants(poisoned, monkeypatch, bc, dtype, cl, fwd, bwd):
    """Every switchable variant against the reference: outputs, last state and all gradients, with an initial
    state and packed sequences. 4-step checkpoints over 30 steps: 8 segments, parts of 8 or 12 steps (the last
    one shorter); three SMs, so that parts=0 splits the 4 programs (of 4 channels) into 4 parts."""
    from mambakit.ops import _triton_selective_scan as k

    monkeypatch.setattr(k, "num_sms", lambda device: 3)
    monkeypatch.setitem(k.FWD_CONFIG, "chunk", 4)
    monkeypatch.setitem(k.FWD_CONFIG, "seg", 4)
    for cfg, over in ((k.FWD_CONFIG, fwd), (k.BWD_CONFIG, bwd)):
        for key, v in over.items():
            monkeypatch.setitem(cfg, key, v)
    combines = []  # (reverse, parts) of every pass 2: proves that the split ran
    combine = k._combine_parts
    monkeypatch.setattr(k, "_combine_parts", lambda e, *a, **kw: combines.append((kw["reverse"], e.shape[1]))
                        or combine(e, *a, **kw))
    shape = dict(b=2, d=8, l=30, n=4) if not ON_GPU else dict(TRITON_SHAPE, l=301)
    check_kernel_rule(bc, dtype, seq_idx=split_seq_idx(shape["b"], shape["l"]), channels_last=cl,
                      atol=1e-3 if dtype == torch.bfloat16 else 1e-5, **shape)
    if not ON_GPU:
        expect = {(False, 3), (True, 4)} if fwd.get("parts") == 3 else {(True, 2)} if bc == "const" else \
            {(False, 4), (True, 4)}
        assert set(combines) == expect


@needs_triton
def test_time_split_sizes():
    """parts=0 gives part_programs programs per SM (rounded up to a power of two); parts are whole checkpoint
    segments; a fixed count is capped by the segments; parts=0 takes the wide tiles."""
    from mambakit.ops import _triton_selective_scan as k

    u = torch.empty(1, 3072, 65536)
    cfg = dict(k.FWD_CONFIG, parts=0, part_programs=4)
    assert k._time_split(cfg, u, 32, 128) == (8, 8192)  # 96 programs -> 4 * 132 wanted -> 6 -> 8 parts
    assert k._time_split(dict(cfg, parts=1), u, 32, 128) == (1, 65536)
    assert k._time_split(dict(cfg, parts=3), torch.empty(1, 64, 1000), 32, 128) == (3, 384)  # 8 segments
    assert k._time_split(dict(cfg, parts=64), torch.empty(1, 64, 300), 32, 128) == (3, 128)
    assert k._auto_tiles(cfg, u, k._NARROW_FWD)["block_d"] == 32
    assert k._auto_tiles(dict(cfg, parts=1), u, k._NARROW_FWD)["block_d"] == 4


# ------------------------------------------------------------- Triton: the time-parallel forward

@needs_triton
@pytest.mark.parametrize("bc,n,block_d,dtype,steps,bcfg", [
    ("step", 4, 1, torch.float32, None, {}), ("group", 3, 2, torch.float32, None, dict(steps=8)),
    ("const", 4, 4, torch.float32, None, {}), ("step", 4, 2, torch.bfloat16, None, dict(steps=8)),
    # the (T, K) kernels: 4 rows of 4 steps (16-step chunks, several per sequence); the backward's own tile,
    # also 32-step chunks (two of the forward's checkpoints each) with dB/dC in 3 partial copies; {}: the
    # (BLOCK_D, CHUNK) tile backward
    ("step", 4, 1, torch.float32, 4, dict(steps=4)), ("group", 3, 1, torch.bfloat16, 4, dict(steps=2)),
    ("const", 4, 1, torch.float32, 4, dict(steps=4)), ("const", 4, 1, torch.bfloat16, 4, {}),
    ("group", 3, 1, torch.float32, 4, dict(steps=4, chunk=32, copies=3)),
    # two and four channels a program (one warp each on a GPU; dB/dC summed over them before the atomics)
    ("group", 3, 1, torch.float32, 4, dict(steps=8, block_d=2, copies=2)),
    ("const", 4, 1, torch.float32, 4, dict(steps=4, block_d=4)), ("step", 4, 1, torch.bfloat16, 4, dict(steps=8, block_d=8)),
    # the forward saving the state every 8 steps (two a chunk; fseg: FWD_TIME_CONFIG seg), the backward in
    # chunks of 8 (2 rows of 4) with two channels a program, or of 16
    ("group", 3, 1, torch.float32, 4, dict(steps=4, block_d=2, fseg=8)),
    ("step", 4, 1, torch.bfloat16, 4, dict(steps=8, block_d=2)),  # 2 channels of 8 steps a row: _atomic_pair
    ("step", 4, 1, torch.float32, 4, dict(steps=4, chunk=16, fseg=8)),
    # -4: 4 steps a row without prefetching the next state's loads (nor the next chunk's inputs: ahead 0)
    ("step", 4, 1, torch.float32, -4, dict(steps=4, prefetch=False, ahead=0)),
    ("group", 3, 1, torch.bfloat16, 4, dict(steps=8, block_d=4, fseg=16, ahead=0)),
    # shift_da: the backward's dA_{t+1} from dA shifted one step (8 steps a row), with 1, 2 or 4 channels
    ("group", 3, 1, torch.float32, 4, dict(steps=8, shift_da=True)),
    ("step", 4, 1, torch.bfloat16, 4, dict(steps=8, block_d=2, shift_da=True)),
    ("const", 4, 1, torch.float32, 4, dict(steps=8, block_d=4, fseg=16, shift_da=True)),
    # quad: the four channels' dB/dC summed by a reduce-scatter (_atomic_quad), rows of 8 steps, 2 or 4 rows
    ("step", 4, 1, torch.bfloat16, 4, dict(steps=8, block_d=4, fseg=16, quad=True)),
    ("group", 3, 1, torch.float32, 4, dict(steps=8, block_d=4, fseg=32, quad=True, copies=3)),
    # quad "bfly": the same reduce-scatter by pair sums over a channel bit (_atomic_quad_bfly)
    ("step", 4, 1, torch.bfloat16, 4, dict(steps=8, block_d=4, fseg=16, quad="bfly")),
    ("group", 3, 1, torch.float32, 4, dict(steps=8, block_d=4, fseg=32, quad="bfly", copies=3)),
    # ahead: the next chunk's u, delta, dout and z loaded `ahead` states before the end of the state loop
    ("step", 4, 1, torch.bfloat16, 4, dict(steps=8, block_d=4, fseg=16, ahead=2)),
    ("group", 3, 1, torch.float32, 4, dict(steps=4, ahead=1, chunk=32)),
    ("const", 4, 1, torch.float32, 4, dict(steps=8, block_d=2, ahead=8)),
    # a_ahead 2: A loaded two states ahead, cyclically across chunks (d_state 3: the wrap inside a chunk)
    ("step", 4, 1, torch.bfloat16, 4, dict(steps=8, block_d=4, fseg=16, a_ahead=2)),
    ("group", 3, 1, torch.float32, 4, dict(steps=4, a_ahead=2, chunk=32, copies=3)),
    ("const", 4, 1, torch.float32, -4, dict(steps=4, a_ahead=2, prefetch=False))])
def test_triton_time_kernel(poisoned, monkeypatch, bc, n, block_d, dtype, steps, bcfg):
    """The time-parallel forward and backward (from the forward's chunk-start states) against the reference, with an
    initial state and packed sequences starting on a chunk boundary (16) and inside chunks; several channels
    per program, d_state not a power of two. Forced on: proves it ran (channels-last inputs would raise)."""
    from mambakit.ops import _triton_scan_time as tk
    from mambakit.ops import _triton_selective_scan as k

    monkeypatch.setitem(k.FWD_CONFIG, "kernel", "time")
    monkeypatch.setitem(tk.FWD_TIME_CONFIG, "block_d", block_d)
    monkeypatch.setitem(tk.FWD_TIME_CONFIG, "steps", abs(steps) if steps else None)
    if steps:
        monkeypatch.setitem(tk.FWD_TIME_CONFIG, "prefetch", steps > 0)
        monkeypatch.setitem(tk.FWD_TIME_CONFIG, "rows", 4)
    from mambakit.ops import _triton_scan_time_bwd as tb

    bcfg = dict(bcfg)
    monkeypatch.setitem(tk.FWD_TIME_CONFIG, "seg", bcfg.pop("fseg", None))
    for key, v in dict(dict(steps=None), **bcfg).items():
        monkeypatch.setitem(tb.BWD_TIME_CONFIG, key, v)
    kinds = []
    kt, tile = tb._scan_bwd_time_kt_kernel, tb._scan_bwd_time_kernel
    monkeypatch.setattr(tb, "_scan_bwd_time_kt_kernel", _Spy(kt, kinds, "kt"))
    monkeypatch.setattr(tb, "_scan_bwd_time_kernel", _Spy(tile, kinds, "tile"))
    from mambakit.ops import _triton_scan_time_bwd as tb

    monkeypatch.setitem(k.BWD_CONFIG, "kernel", "time")
    calls = []
    fwd, bwd = tk.scan_fwd_time, tb.scan_bwd_time
    monkeypatch.setattr(tk, "scan_fwd_time", lambda *a, **kw: calls.append("f") or fwd(*a, **kw))
    monkeypatch.setattr(tb, "scan_bwd_time", lambda *a, **kw: calls.append("b") or bwd(*a, **kw))
    b, d, l = 2, 8, 40
    seq = torch.zeros(b, l, dtype=torch.int64)
    seq[0, 16:] = 1
    seq[0, 21:] = 2
    seq[1, 35:] = 1
    check_kernel_rule(bc, dtype, seq_idx=seq.to(DEVICE), atol=1e-3 if dtype == torch.bfloat16 else 1e-5,
                      b=b, d=d, l=l, n=n)
    assert "f" in calls and "b" in calls
    assert set(kinds) == {"kt" if bcfg.get("steps") else "tile"}, kinds


def _spy_kt_launches(monkeypatch, keys: dict) -> list:
    """Records ("fwd" or "bwd", {key: meta value or its default}) of every (T, K) forward and backward kernel
    launch, which still runs; key "BC" records the dtypes of the B and C arguments instead."""
    from mambakit.ops import _triton_scan_time as tk
    from mambakit.ops import _triton_scan_time_bwd as tb

    metas = []

    class MetaSpy:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            def launch(*args, **meta):
                rec = {key: meta.get(key, default) for key, default in keys.items()}
                if "BC" in keys:
                    rec["BC"] = (args[3].dtype, args[4].dtype)
                metas.append((self.name, rec))
                return self.kernel[grid](*args, **meta)
            return launch

    monkeypatch.setattr(tk, "_scan_time_fwd_kt_kernel", MetaSpy(tk._scan_time_fwd_kt_kernel, "fwd"))
    monkeypatch.setattr(tb, "_scan_bwd_time_kt_kernel", MetaSpy(tb._scan_bwd_time_kt_kernel, "bwd"))
    return metas


@needs_triton
@pytest.mark.parametrize("bc,dtype,l,even,pairs", [
    ("step", torch.bfloat16, 48, True, True), ("group", torch.bfloat16, 64, True, True),
    ("step", torch.float32, 48, True, False), ("step", torch.bfloat16, 40, False, False)])
def test_triton_time_forward_even_pairs(poisoned, monkeypatch, bc, dtype, l, even, pairs):
    """FWD_TIME_CONFIG even / pairs: a length that is a multiple of the chunk (16 here) loads and stores without
    masks (EVEN), and bf16 B/C per step are then read as int32 pairs (PAIRS); fp32 B/C or a ragged length fall
    back. The backward (8 steps a row, shift_da on) reads them as pairs too (BWD_TIME_CONFIG pairs). Against
    the reference with packed sequences; both launches' meta checked."""
    from mambakit.ops import _triton_scan_time as tk
    from mambakit.ops import _triton_scan_time_bwd as tb
    from mambakit.ops import _triton_selective_scan as k

    monkeypatch.setitem(k.FWD_CONFIG, "kernel", "time")
    monkeypatch.setitem(k.BWD_CONFIG, "kernel", "time")
    for key, v in dict(steps=4, rows=4, even=True, pairs=True).items():
        monkeypatch.setitem(tk.FWD_TIME_CONFIG, key, v)
    for key, v in dict(steps=8, pairs=True, shift_da=True).items():
        monkeypatch.setitem(tb.BWD_TIME_CONFIG, key, v)
    metas = _spy_kt_launches(monkeypatch, dict(EVEN=False, PAIRS=False))
    b, d = 2, 8
    check_kernel_rule(bc, dtype, seq_idx=seq_idx_for(b, l), atol=1e-3 if dtype == torch.bfloat16 else 1e-5,
                      b=b, d=d, l=l, n=3)
    got = {(name, m["EVEN"], m["PAIRS"]) for name, m in metas}
    assert got == {("fwd", even, pairs), ("bwd", False, pairs)}, metas


@needs_triton
@pytest.mark.parametrize("bc,dtype,l,seq,seg,pairs,agg,bc_f32,ahead", [
    ("step", torch.float32, 40, True, None, False, True, False, 0),
    ("group", torch.bfloat16, 64, True, 16, True, True, False, 0),
    ("const", torch.float32, 37, False, 8, False, True, False, 0),
    ("step", torch.bfloat16, 9, True, None, False, True, False, 0),
    ("step", torch.bfloat16, 64, True, 16, True, False, False, 0),
    ("group", torch.float32, 40, True, None, False, False, False, 0),
    ("group", torch.bfloat16, 40, True, 16, False, True, True, 0),
    ("step", torch.float16, 64, False, None, False, False, True, 0),
    ("step", torch.bfloat16, 100, True, 16, False, True, False, 2),
    ("group", torch.bfloat16, 96, False, None, True, True, False, 1),
    ("const", torch.float32, 70, True, None, False, False, False, 8)])
def test_triton_time_forward_agg(poisoned, monkeypatch, bc, dtype, l, seq, seg, pairs, agg, bc_f32, ahead):
    """FWD_TIME_CONFIG agg (8 steps a row, the default): row aggregates first (the row's decay from dt's row
    sum), then one exact pass over each row from its true incoming state; agg off: the scans with cumulative
    dA and the per-step fix-up. Ragged and whole chunks (32 steps: 4 rows), packed sequences (a reset inside a
    row zeroes its decay), constant / per-step / grouped B and C, saved states every seg steps for the
    backward, bf16 pairs, 16-bit B and C widened to fp32 before the launch (bc_f32), the next chunk's u and
    delta (and this chunk's z) loaded late in the state loop (ahead; 2-4 chunks); against the reference, and
    the launch meta checked."""
    from mambakit.ops import _triton_scan_time as tk
    from mambakit.ops import _triton_selective_scan as k

    monkeypatch.setitem(k.FWD_CONFIG, "kernel", "time")
    monkeypatch.setitem(k.BWD_CONFIG, "kernel", "time")
    for key, v in dict(steps=8, rows=4, agg=agg, seg=seg, even=pairs, pairs=pairs, bc_f32=bc_f32,
                       ahead=ahead).items():
        monkeypatch.setitem(tk.FWD_TIME_CONFIG, key, v)
    metas = _spy_kt_launches(monkeypatch, dict(AGG=False, PAIRS=False, SEG_ROWS=0, T=0, BC=None, AHEAD=0))
    b, d = 2, 8
    check_kernel_rule(bc, dtype, seq_idx=seq_idx_for(b, l) if seq else None,
                      atol=1e-3 if dtype == torch.bfloat16 else 1e-5, b=b, d=d, l=l, n=3)
    fwd = [m for name, m in metas if name == "fwd"]
    if bc_f32:  # the forward kernel gets fp32 B and C
        assert {m["BC"] for m in fwd} == {(torch.float32, torch.float32)}, metas
    assert fwd and all(m["AGG"] == agg and m["PAIRS"] == pairs and m["AHEAD"] == ahead for m in fwd), metas
    assert all(m["SEG_ROWS"] == (seg // 8 if seg else m["T"]) for m in fwd), metas


@needs_triton
@pytest.mark.parametrize("bc,l,seq,seg,agg,n,want", [
    ("group", 64, True, 16, True, 3, True),  # d_state 3: the two-ahead wrap inside a chunk; saved states
    ("step", 96, False, None, False, 4, True),  # 3 chunks, the scans without agg
    ("step", 64, True, None, True, 1, True),  # d_state 1: each load is the next chunks' state 0
    ("step", 40, True, None, True, 3, False)])  # a ragged last chunk: no pairs, so not taken
def test_triton_time_forward_ahead2(poisoned, monkeypatch, bc, l, seq, seg, agg, n, want):
    """FWD_TIME_CONFIG ahead2: A and B / C (bf16 pairs of whole chunks only) loaded raw two states ahead,
    cyclically into the next chunk, and widened at their use; against the reference (forward and backward),
    with the launch meta checked."""
    from mambakit.ops import _triton_scan_time as tk
    from mambakit.ops import _triton_selective_scan as k

    monkeypatch.setitem(k.FWD_CONFIG, "kernel", "time")
    monkeypatch.setitem(k.BWD_CONFIG, "kernel", "time")
    for key, v in dict(steps=8, rows=4, agg=agg, seg=seg, even=True, pairs=True, ahead2=True).items():
        monkeypatch.setitem(tk.FWD_TIME_CONFIG, key, v)
    metas = _spy_kt_launches(monkeypatch, dict(AHEAD2=False, PAIRS=False))
    b, d = 2, 8
    check_kernel_rule(bc, torch.bfloat16, seq_idx=seq_idx_for(b, l) if seq else None, atol=1e-3, b=b, d=d, l=l,
                      n=n)
    fwd = [m for name, m in metas if name == "fwd"]
    assert fwd and all(m["AHEAD2"] is want and m["PAIRS"] is want for m in fwd), metas


@needs_triton
@pytest.mark.parametrize("busy", [True, False])
def test_triton_time_kernels_busy_grid_plan(poisoned, monkeypatch, busy):
    """The default plan: on a busy grid the forward saves a state every BUSY_SEG (64) steps and the backward
    runs 4 channels a program (chunks of 64 steps); otherwise a state a 256-step chunk and one channel. Both
    against the reference (initial state, packed sequences, groups), and the launches' meta checked."""
    from mambakit.ops import _triton_scan_time as tk
    from mambakit.ops import _triton_scan_time_bwd as tb
    from mambakit.ops import _triton_selective_scan as k

    monkeypatch.setitem(k.FWD_CONFIG, "kernel", "time")
    monkeypatch.setitem(k.BWD_CONFIG, "kernel", "time")
    monkeypatch.setattr(tk, "BUSY_CHANNELS_PER_SM", 0 if busy else 1 << 30)
    monkeypatch.setitem(tk.FWD_TIME_CONFIG, "rows", 32)  # the default tile (the fixture shrinks it)
    metas = _spy_kt_launches(monkeypatch, dict(T=None, K=None, SEG_ROWS=None, DB=None, QUAD=0))
    b, d, l = 2, 8, 300
    check_kernel_rule("group", torch.float32, seq_idx=seq_idx_for(b, l), b=b, d=d, l=l, n=3)
    fwd = [m for name, m in metas if name == "fwd"]
    bwd = [m for name, m in metas if name == "bwd"]
    assert fwd and bwd, metas
    assert fwd[0] == dict(T=32, K=8, SEG_ROWS=8 if busy else 32, DB=None, QUAD=0)
    assert bwd[0]["DB"] == (4 if busy else 1) and bwd[0]["T"] * bwd[0]["K"] == (64 if busy else 256)
    assert bwd[0]["QUAD"] == int(busy)  # the busy plan's 4 channels: dB/dC by _atomic_quad


@needs_triton
def test_time_backward_shift_da_plan():
    """BWD_TIME_CONFIG shift_da reaches the (T, K) backward's launch only with 8 steps a row (its column
    split); the tests above run it against the reference."""
    from mambakit.ops import _triton_scan_time_bwd as tb

    u, A, B = torch.empty(2, 8, 64), torch.empty(8, 4), torch.empty(2, 4, 64)
    for steps, want in ((8, True), (4, False)):
        cfg = dict(tb.BWD_TIME_CONFIG, steps=steps, shift_da=True, block_d=1)
        assert tb._meta(cfg, u, A, B, 16)["SHIFT_DA"] is want
    assert tb._meta(dict(tb.BWD_TIME_CONFIG, block_d=1), u, A, B, 16)["SHIFT_DA"] is False


@needs_triton
def test_time_backward_quad_plan():
    """BWD_TIME_CONFIG quad (the default) reaches the (T, K) backward's launch only with 4 channels of 8-step
    rows (the busy-grid plan), ahead unless shift_da; test_triton_time_kernel runs them against the reference,
    and test_triton_time_kernels_busy_grid_plan the default plan."""
    from mambakit.ops import _triton_scan_time_bwd as tb

    u, A, B = torch.empty(2, 8, 64), torch.empty(8, 4), torch.empty(2, 4, 64)
    for steps, block_d, quad, want in ((8, 4, True, 1), (8, 4, "bfly", 2), (8, 2, True, 0), (4, 4, "bfly", 0),
                                       (8, 4, False, 0)):
        cfg = dict(tb.BWD_TIME_CONFIG, steps=steps, quad=quad, block_d=block_d)
        assert tb._meta(cfg, u, A, B, 16)["QUAD"] == want, (steps, block_d, quad)
    # ahead reaches the launch, except with shift_da (which loads delta after the chunk its own way)
    for shift_da, want in ((False, 3), (True, 0)):
        cfg = dict(tb.BWD_TIME_CONFIG, steps=8, ahead=3, shift_da=shift_da)
        assert tb._meta(cfg, u, A, B, 16)["AHEAD"] == want
    # a_ahead 1 / 2 reach the launch; anything else is refused by name
    for a_ahead in (1, 2):
        assert tb._meta(dict(tb.BWD_TIME_CONFIG, steps=8, a_ahead=a_ahead), u, A, B, 16)["A_AHEAD"] == a_ahead
    with pytest.raises(ValueError, match="a_ahead=3"):
        tb._meta(dict(tb.BWD_TIME_CONFIG, steps=8, a_ahead=3), u, A, B, 16)


class _Spy:
    """A kernel stand-in that records its launches (kernel[grid](...)) and launches the real one."""

    def __init__(self, kernel, log, name):
        self.kernel, self.log, self.name = kernel, log, name

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@needs_triton
def test_triton_time_kernel_dispatch(poisoned, monkeypatch):
    """auto: contiguous inputs take the time-parallel kernel, channels-last ones (and d_state > 16) the
    channel-parallel kernel; forcing the time kernel on channels-last inputs is a clear error."""
    from mambakit.ops import _triton_selective_scan as k

    x = make_inputs(1, 4, 20, 4, "step", dtype=torch.float32, device=DEVICE)
    args = [x[a].detach() for a in ("u", "delta", "A", "B", "C")]
    cl = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in args[:2]] + args[2:]
    assert k._time_kernel(dict(k.FWD_CONFIG), args[0], args[1], None, args[2])
    assert not k._time_kernel(dict(k.FWD_CONFIG), cl[0], cl[1], None, cl[2])
    assert not k._time_kernel(dict(k.FWD_CONFIG, kernel="channel"), args[0], args[1], None, args[2])
    wide_n = torch.zeros(4, 32, device=DEVICE)  # d_state 32: above the time kernel's measured range
    assert not k._time_kernel(dict(k.FWD_CONFIG), args[0], args[1], None, wide_n)
    with pytest.raises(ValueError, match="contiguous along the sequence"):
        k.scan_fwd(*cl, None, None, None, None, None, True, False, kernel="time")
