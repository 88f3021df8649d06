"""Fused decode step (ops.decode): each fused kernel against the unfused ops it replaces, then whole models
decoding with the fused path against the unfused one (logits and every cached state).

The kernels run through Triton's interpreter on CPU (tiny shapes); on a GPU (MAMBAKIT_TEST_DEVICE=cuda)
the same tests run the compiled kernels.
"""
import pytest
import torch

import mambakit.ops.decode as dec
from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.cache import InferenceParams
from mambakit.ops.dispatch import backend
from numerics import DEVICE, rel_err, triton_ok

pytestmark = pytest.mark.skipif(not triton_ok, reason="no triton")
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


@pytest.fixture(params=["whole", "whole-few-sms", "whole-split", "dot"])
def gemv_kernel(request, monkeypatch):
    """Each GEMV kernel; "whole-few-sms" pretends the device has 4 SMs, so that a program owns several outputs
    (BLOCK_N > 1) and the last one a partial block; "whole-split" holds a row as two power-of-two tiles and
    "whole" as one (whatever the default), on 4 SMs too."""
    monkeypatch.setitem(dec.GEMV_CONFIG, "kernel", request.param.split("-")[0])
    if request.param.startswith("whole"):
        monkeypatch.setitem(dec.GEMV_CONFIG, "split", request.param == "whole-split")
    if request.param in ("whole-few-sms", "whole-split"):
        monkeypatch.setattr(dec, "num_sms", lambda device: 4)
    return request.param


def rnd(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale + shift).to(DEVICE, dtype)


def both(fn, *args, **kwargs):
    """fn on the unfused ops (torch backend) and on the fused kernels, from copies of every tensor argument
    (the window and state arguments are updated in place). Returns (unfused, fused, unfused args, fused args)."""
    def clone(a):
        return a.clone() if isinstance(a, torch.Tensor) else a
    a_ref, a_k = [clone(a) for a in args], [clone(a) for a in args]
    kw_ref, kw_k = {k: clone(v) for k, v in kwargs.items()}, {k: clone(v) for k, v in kwargs.items()}
    with backend("torch"):
        ref = fn(*a_ref, **kw_ref)
    with backend("triton"):
        out = fn(*a_k, **kw_k)
    return ref, out, (a_ref, kw_ref), (a_k, kw_k)


def close(out, ref, dtype, what):
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype and o.shape == r.shape, what
        assert rel_err(o, r) < TOL[dtype], f"{what}: rel err {rel_err(o, r):.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual,fp32,bias,window", [(False, False, False, False), (True, False, True, True),
                                                        (False, True, False, True), (True, True, False, False)])
def test_norm_linear(dtype, residual, fp32, bias, window, gemv_kernel):
    b, k, n, c, w = 3, 40, 70, 20, 4
    x, wt, nw = rnd(b, k, dtype=dtype), rnd(n, k, dtype=dtype, scale=0.2), rnd(k, dtype=dtype, shift=1.0)
    res = rnd(b, k, dtype=torch.float32 if fp32 else dtype) if residual else None
    conv = dict(conv_state=rnd(b, c, w, dtype=dtype), conv_start=30, conv_weight=rnd(c, w, dtype=dtype, scale=0.5),
                conv_bias=rnd(c, dtype=dtype) if bias else None) if window else {}
    ref, out, (_, kr), (_, kk) = both(dec.norm_linear, x, wt, nw, 1e-5, residual=res, residual_in_fp32=fp32,
                                      bias=rnd(n, dtype=dtype) if bias else None, **conv)
    close(out, ref, dtype, "out, residual (, conv out)")
    assert len(out) == (3 if window else 2)
    if window:  # the window took columns 30..49 of the output, oldest value dropped
        close(kk["conv_state"], kr["conv_state"], dtype, "window")
        assert torch.equal(kk["conv_state"][:, :, :-1], conv["conv_state"][:, :, 1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,before", [(48, False), (24, False), (12, True)])
def test_gated_norm_linear(dtype, group_size, before, gemv_kernel):
    b, k, n = 2, 48, 30
    args = (rnd(b, k, dtype=dtype), rnd(b, k, dtype=dtype), rnd(k, dtype=dtype, shift=1.0), 1e-5, group_size,
            before, rnd(n, k, dtype=dtype, scale=0.2))
    ref, out, _, _ = both(dec.gated_norm_linear, *args)
    close(out, ref, dtype, "out_proj(gated norm)")


def _spy_whole_launches(monkeypatch) -> list:
    """Records (grid, LOOP, BLOCK_N) of every _gemv_whole_kernel launch, which still runs."""
    launches = []
    kernel = dec._gemv_whole_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **meta):
                launches.append((grid, meta["LOOP"], meta["BLOCK_N"]))
                return kernel[grid](*a, **meta)
            return launch

    monkeypatch.setattr(dec, "_gemv_whole_kernel", Spy())
    return launches


def test_loop_rule(monkeypatch):
    """kernel "whole": batch-1 GEMVs with K above loop_min_k take the loop kernel (loop_elements a block), the
    others, batch 2, and any K with loop_min_k None the one-block-a-program kernel; outputs as the unfused."""
    monkeypatch.setitem(dec.GEMV_CONFIG, "loop_min_k", 32)
    monkeypatch.setitem(dec.GEMV_CONFIG, "loop_elements", 80)  # 2 rows of K = 40 a block
    monkeypatch.setattr(dec, "num_sms", lambda device: 4)
    launches = _spy_whole_launches(monkeypatch)
    for b, k, loop in ((1, 40, True), (2, 40, False), (1, 32, False)):
        x, wt = rnd(b, k), rnd(70, k, scale=0.2)
        ref, out, _, _ = both(dec.linear, x, wt)
        close(out, ref, torch.float32, f"linear b{b} k{k}")
        assert launches[-1][1] == loop and (launches[-1][2] == 2) == loop, (b, k, launches[-1])
    monkeypatch.setitem(dec.GEMV_CONFIG, "loop_min_k", None)
    both(dec.linear, rnd(1, 40), rnd(70, 40))
    assert launches[-1][1] is False


@pytest.mark.parametrize("dtype", DTYPES)
def test_loop_kernel_batch1(monkeypatch, dtype):
    """GEMV_CONFIG kernel "loop" (batch 1): on 1 SM, 2 persistent programs walk 9 blocks of 8 outputs each,
    loading the next block ahead; the norm + linear + conv window, gated norm + linear (two groups that straddle
    the split tiles) and plain linear against the unfused ops."""
    monkeypatch.setitem(dec.GEMV_CONFIG, "kernel", "loop")
    monkeypatch.setitem(dec.GEMV_CONFIG, "loop_elements", 512)  # 8 rows of K = 40 (32 + 8) a block
    monkeypatch.setitem(dec.GEMV_CONFIG, "loop_programs_per_sm", 2)
    monkeypatch.setattr(dec, "num_sms", lambda device: 1)
    launches = _spy_whole_launches(monkeypatch)
    k, n = 40, 70
    x, wt, nw, res = rnd(1, k, dtype=dtype), rnd(n, k, dtype=dtype, scale=0.2), rnd(k, dtype=dtype, shift=1.0), \
        rnd(1, k, dtype=dtype)
    conv = dict(conv_state=rnd(1, 20, 4, dtype=dtype), conv_start=30, conv_weight=rnd(20, 4, dtype=dtype, scale=0.5),
                conv_bias=rnd(20, dtype=dtype))
    ref, out, (_, kr), (_, kk) = both(dec.norm_linear, x, wt, nw, 1e-5, residual=res, bias=rnd(n, dtype=dtype), **conv)
    close(out, ref, dtype, "out, residual, conv out")
    close(kk["conv_state"], kr["conv_state"], dtype, "window")
    ref, out, _, _ = both(dec.gated_norm_linear, rnd(1, k, dtype=dtype), rnd(1, k, dtype=dtype),
                          rnd(k, dtype=dtype, shift=1.0), 1e-5, 20, False, wt)
    close(out, ref, dtype, "out_proj(gated norm)")
    ref, out, _, _ = both(dec.linear, x, wt)
    close(out, ref, dtype, "linear")
    assert launches and all(lp and grid == (2,) and bn == 8 for grid, lp, bn in launches), launches


def test_linear(gemv_kernel):
    x, wt, bias = rnd(3, 50), rnd(17, 50), rnd(17)
    ref, out, _, _ = both(dec.linear, x, wt, bias)
    close(out, ref, torch.float32, "linear")


@pytest.fixture(params=[True, False], ids=["early-state", "late-state"])
def early_state(request, monkeypatch):
    """decode.EARLY_STATE both ways; yields the launch metas' EARLY_STATE values of both state update kernels."""
    import mambakit.ops.state_update as su

    monkeypatch.setattr(dec, "EARLY_STATE", request.param)
    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*a, **meta):
                seen.append(meta["EARLY_STATE"])
                return self.kernel[grid](*a, **meta)
            return launch

    monkeypatch.setattr(su, "_state_update_kernel", Spy(su._state_update_kernel))
    monkeypatch.setattr(dec, "_m1_update_kernel", Spy(dec._m1_update_kernel))
    yield request.param, seen


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ngroups,d_hdim,dt_limit,gate", [(1, False, (0.0, float("inf")), False),
                                                           (2, True, (0.05, 0.5), True)])
def test_mamba2_state_update(dtype, ngroups, d_hdim, dt_limit, gate, early_state):
    """The decode step's state update (the op's kernel, loading the state before or after the grid wait)."""
    b, h, p, n = 2, 4, 8, 16
    d_ssm, conv_dim = h * p, h * p + 2 * ngroups * n
    zx = rnd(b, d_ssm + conv_dim + h, dtype=dtype)  # [z, xBC, dt]
    args = (zx, rnd(b, conv_dim, dtype=dtype), rnd(b, h, p, n, dtype=dtype), -torch.exp(rnd(h)),
            rnd(h, p) if d_hdim else rnd(h), rnd(h, scale=0.5), dt_limit, ngroups)
    ref, out, (ar, _), (ak, _) = both(dec.mamba2_state_update, *args, dt_start=d_ssm + conv_dim,
                                      z_start=0 if gate else None)
    close(out, ref, dtype, "y")
    close(ak[2], ar[2], dtype, "ssm_state")
    assert early_state[1] == [early_state[0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mamba1_state_update(dtype, early_state):
    b, d, n, r = 2, 24, 8, 5
    args = (rnd(b, d, dtype=dtype), rnd(b, r + 2 * n, dtype=dtype), rnd(d, r, dtype=dtype, scale=0.5),
            rnd(d, scale=0.3), rnd(b, d, n, dtype=dtype), -torch.exp(rnd(d, n, scale=0.5)), rnd(d),
            rnd(b, d, dtype=dtype))
    ref, out, (ar, _), (ak, _) = both(dec.mamba1_state_update, *args)
    close(out, ref, dtype, "y")
    close(ak[4], ar[4], dtype, "ssm_state")
    assert early_state[1] == [early_state[0]]


def test_op_state_update_loads_state_after_wait(early_state):
    """The public selective_state_update never loads the state early (its caller may have just written it)."""
    from mambakit.ops import selective_state_update

    with backend("triton"):
        selective_state_update(rnd(1, 4, 8, 16), rnd(1, 4, 8), rnd(1, 4, 8), -torch.exp(rnd(4, 8, 16)), rnd(1, 1, 16),
                               rnd(1, 1, 16))
    assert early_state[1] == [False]


# ---- whole models ------------------------------------------------------------------------------------------

MODELS = {
    "mamba1": dict(ssm_cfg={"d_state": 8}),
    "mamba2": dict(ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}),
    "mamba2-g2-hdimD-limit-fp32res": dict(
        ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2, "D_has_hdim": True,
                 "dt_limit": (0.01, 0.3), "chunk_size": 8}, residual_in_fp32=True),
    "mamba2-no-gated-norm": dict(ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "rmsnorm": False,
                                          "chunk_size": 8}),
}


def _decode(model, ids, steps, fused):
    """Prefill (PyTorch backend), then ``steps`` greedy decode steps on the fused or unfused path."""
    params = InferenceParams(max_seqlen=ids.shape[1] + steps, max_batch_size=ids.shape[0])
    with torch.no_grad():
        with backend("torch"):
            logits = model(ids, inference_params=params, num_last_tokens=1).logits[:, -1]
        params.seqlen_offset += ids.shape[1]
        out = []
        for _ in range(steps):
            tok = logits.argmax(-1, keepdim=True)
            with backend("triton" if fused else "torch"):
                logits = model.decode_step(tok, params)
            params.seqlen_offset += 1
            out.append(logits)
    return torch.stack(out, 1), params


def _fused_equals_unfused(model, monkeypatch, steps=3):
    """Greedy decoding of 2 rows on the unfused path (which must launch no fused GEMV) and on the fused one:
    logits and every cached state equal. Returns the fused GEMVs' prologue kinds (``pro``), in launch order."""
    calls = []
    gemv = dec._gemv
    monkeypatch.setattr(dec, "_gemv", lambda *a, **k: calls.append(k["pro"]) or gemv(*a, **k))
    ids = torch.randint(0, 60, (2, 5)).to(DEVICE)
    ref, p_ref = _decode(model, ids, steps, fused=False)
    assert not calls
    out, p_fused = _decode(model, ids, steps, fused=True)
    assert rel_err(out, ref) < 1e-5
    for i, (conv, ssm) in p_ref.key_value_memory_dict.items():
        conv_k, ssm_k = p_fused.key_value_memory_dict[i]
        assert rel_err(conv_k, conv) < 1e-6 and rel_err(ssm_k, ssm) < 1e-5, f"layer {i} states"
    return calls


@pytest.mark.parametrize("name", list(MODELS))
def test_model_fused_decode_equals_unfused(name, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(dec, "MAX_FUSED_BATCH", 2)  # the kernels take several rows: test two
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=60, pad_vocab_size_multiple=16, **MODELS[name])
    model = MambaLMHeadModel(cfg, device=DEVICE, dtype=torch.float32).eval()
    calls = _fused_equals_unfused(model, monkeypatch)
    mamba1 = name == "mamba1"
    # per layer and step: norm+in_proj, then x_proj and out_proj (Mamba-1) or gated norm+out_proj (Mamba-2)
    assert len(calls) == 2 * 3 * (3 if mamba1 else 2)


@pytest.mark.parametrize("limit", ["MAX_FUSED_BATCH", "MAX_FUSED_WEIGHT"])
def test_large_batch_or_layer_takes_unfused_path(monkeypatch, limit):
    """Above MAX_FUSED_BATCH, or above MAX_FUSED_WEIGHT with LARGE_MAMBA2_STEP "unfused", no fused GEMV runs."""
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=1, vocab_size=60, pad_vocab_size_multiple=16, **MODELS["mamba2"])
    model = MambaLMHeadModel(cfg, device=DEVICE, dtype=torch.float32).eval()
    monkeypatch.setattr(dec, limit, 1)
    monkeypatch.setattr(dec, "LARGE_MAMBA2_STEP", "unfused")
    monkeypatch.setattr(dec, "_gemv", lambda *a, **k: pytest.fail(f"fused kernel used above {limit}"))
    ids = torch.randint(0, 60, (2, 4)).to(DEVICE)
    ref, _ = _decode(model, ids, 1, fused=False)
    out, _ = _decode(model, ids, 1, fused=True)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_large_mamba2_layer_fused_out_step(monkeypatch, residual_in_fp32):
    """LARGE_MAMBA2_STEP="fused_out": a Mamba-2 layer above MAX_FUSED_WEIGHT keeps the unfused norm, in_proj
    and conv update but fuses the gated norm into out_proj (the only fused GEMV launched); logits and every
    cached state equal the unfused step's."""
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=60, pad_vocab_size_multiple=16,
                      residual_in_fp32=residual_in_fp32, **MODELS["mamba2"])
    model = MambaLMHeadModel(cfg, device=DEVICE, dtype=torch.float32).eval()
    monkeypatch.setattr(dec, "MAX_FUSED_WEIGHT", 1)
    monkeypatch.setattr(dec, "LARGE_MAMBA2_STEP", "fused_out")
    calls = _fused_equals_unfused(model, monkeypatch)
    assert calls == [2] * (2 * 3)  # gated norm + out_proj, per layer and step


@pytest.mark.skipif(not triton_ok, reason="triton not installed")
@pytest.mark.parametrize("elements", [28160, 32768, 5000, 100])
def test_whole_tiles_are_powers_of_two(monkeypatch, elements):
    """Any GEMV_CONFIG["elements"] gives a power-of-two row tile (tl.arange needs one); 28160 (11 rows of
    K = 2560) crashed the compile before, and the tile never exceeds the elements asked for."""
    monkeypatch.setattr(dec, "num_sms", lambda device: 132)
    monkeypatch.setitem(dec.GEMV_CONFIG, "elements", elements)
    for split, tiles in ((False, (4096, 0)), (True, (2048, 512))):
        monkeypatch.setitem(dec.GEMV_CONFIG, "split", split)
        bn, bk, bk2 = dec._whole_tiles(10576, 2560, "cpu")
        assert (bk, bk2) == tiles and bn & (bn - 1) == 0 and bn >= 1
        assert bn * (bk + bk2) <= max(elements, bk + bk2)
    assert dec._whole_tiles(10576, 2048, "cpu")[1:] == (2048, 0)  # a power of two needs no second tile
    assert dec._whole_tiles(10576, 5000, "cpu")[1:] == (4096, 1024)
