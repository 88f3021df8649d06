#!/usr/bin/env python
"""GPU check of mambakit's SSD scan (``mamba_chunk_scan_combined``): correctness at full size, long sequences,
timings against the official package's anchors (docs: /work/shared/ANCHORS.md), the time-split state kernels
for long single sequences (issue 5: parts P, against the unsplit path), block-size variants per stage, and the
dB / dC backward variants (issue 5: "summed" against the default "per_head").

    python scripts/gpu_check_ssd.py --out OUT_DIR
    python scripts/gpu_check_ssd.py --out OUT_DIR --only dbc_variants     # just the dB / dC variants

Each part runs on its own: a failure is recorded (with its traceback) in OUT_DIR/ssd_check.json and the other
parts still run. A short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

# (shape, official fwd ms, goal fwd ms, official fwd+bwd ms, goal fwd+bwd ms) on an H100, bf16, chunk 256
GOALS = [
    (dict(b=4, l=4096, h=48, p=64, n=128, g=1), 0.821, 0.60, 3.87, 3.0),
    (dict(b=1, l=65536, h=48, p=64, n=128, g=1), 2.22, 1.7, 9.34, 7.0),
    (dict(b=8, l=2048, h=80, p=64, n=128, g=1), 0.822, 0.60, 5.13, 4.0),
]
# per-stage block variants (the first of each list is the default the kernels pick for the first goal shape)
VARIANTS = {
    "state_fwd": [dict(), dict(BLOCK_P=32, BLOCK_N=128), dict(BLOCK_P=64, BLOCK_N=32, num_stages=3),
                  dict(BLOCK_P=32, BLOCK_N=64, num_stages=3), dict(BLOCK_P=64, BLOCK_N=128, num_warps=8)],
    "state_bwd": [dict(), dict(BLOCK_P=32, BLOCK_N=128), dict(BLOCK_P=64, BLOCK_N=32, num_stages=3),
                  dict(BLOCK_P=32, BLOCK_N=64, num_stages=3), dict(BLOCK_P=64, BLOCK_N=128, num_warps=8)],
    "scan_fwd": [dict(), dict(BLOCK_M=128, BLOCK_K=64, num_warps=8), dict(BLOCK_M=64, BLOCK_K=32, num_stages=3),
                 dict(BLOCK_M=128, BLOCK_K=32, num_warps=4, num_stages=3), dict(BLOCK_M=64, BLOCK_K=64, num_stages=3),
                 dict(BLOCK_M=64, BLOCK_K=64, num_stages=2, num_warps=4), dict(BLOCK_M=128, BLOCK_K=64, num_stages=2),
                 dict(BLOCK_M=64, BLOCK_K=32, num_stages=4, num_warps=4)],
    "scan_bwd_dx": [dict(), dict(BLOCK_M=128, BLOCK_K=64, num_warps=8), dict(BLOCK_M=64, BLOCK_K=32, num_stages=3),
                    dict(BLOCK_M=128, BLOCK_K=32, num_warps=4, num_stages=3),
                    dict(BLOCK_M=64, BLOCK_K=64, num_stages=3)],
    "scan_bwd_dbc": [dict(), dict(num_warps=8), dict(BLOCK_M=64, BLOCK_K=32, num_stages=3),
                     dict(BLOCK_M=128, BLOCK_K=64, num_warps=8), dict(HEAD_SPLIT=1), dict(VARIANT="summed")],
}
RESULTS: dict = {}
T0 = time.time()
STAGE_BUDGET = 85.0  # seconds after which stages_and_variants times only the defaults (--stage-budget)
STAGE_SHAPES: list = []  # --stage-shapes b8,b4: the goal shapes (by batch) that stages_and_variants times
DEV = "cuda"
# --smoke shrinks every shape (CPU + TRITON_INTERPRET=1 works) to check the script itself
SMALL = dict(long_l=1 << 17, huge_l=1 << 20, long_h=48, fp32=(2, 2048, 16), bf16=(2, 4096, 48), chunk=256,
             low=torch.bfloat16, split=dict(b=1, l=65536, h=48, p=64, n=128, g=1), parts=(4, 8, 16),
             dbc_shapes=[dict(b=1, l=65536, h=48, p=64, n=128, g=1), dict(b=4, l=4096, h=48, p=64, n=128, g=1)],
             dbc_check=dict(b=2, l=4096, h=48, p=64, n=128, g=2), dbc_check32=dict(b=2, l=2048, h=16, p=64, n=128, g=2))
# dB / dC backward configurations timed by dbc_variants() (BLOCKS["scan_bwd_dbc"]; "default" is the current one)
DBC_CONFIGS = {
    "default": dict(),
    "summed": dict(VARIANT="summed"),  # its tuned tiles (chunk_scan._SUMMED_16BIT)
    "summed st2 M64": dict(VARIANT="summed", W_STAGES=2, BLOCK_M=64, num_warps=4, num_stages=2),
    "summed M64": dict(VARIANT="summed", BLOCK_M=64, num_warps=4),
    "summed W128": dict(VARIANT="summed", BLOCK_W=128, W_WARPS=8),
}
# state-kernel plans timed by time_split(); "old" is the default before the time split (BLOCK_N shrunk to 32,
# 2 stages), "whole" the unsplit kernel with the measured 3 stages, "default" whatever state_plan picks
SPLIT_CONFIGS = {"old": dict(TIME_SPLIT=1, num_stages=2), "whole": dict(TIME_SPLIT=1), "default": dict()}


def bench_ms(fn) -> float:
    if DEV == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def part(fn):
    """Run one part; record its result or its traceback, never stop the script."""
    name = fn.__name__
    t = time.time()
    try:
        RESULTS[name] = fn()
    except Exception as exc:  # noqa: BLE001 - every failure is data here
        RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
    RESULTS.setdefault("_seconds", {})[name] = round(time.time() - t, 1)
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    print(f"[{name}] done in {time.time() - t:.1f}s (total {time.time() - T0:.0f}s)", flush=True)


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make(b, l, h, p, n, g, dtype, D_hdim=False, z=False, init=False, seed=0, bias=(-4, -2)):
    """Random inputs like a Mamba-2 layer's: activations in ``dtype``, A/D/dt_bias in fp32 (dt_bias uniform
    in ``bias``: (-4, -2) gives dt ~ 0.05, whose state vanishes within a chunk or two; (-8, -6) dt ~ 0.001)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)

    def r(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, device=DEV, generator=gen) * scale).to(dt)

    t = dict(x=r(b, l, h, p), dt=r(b, l, h, scale=0.5), B=r(b, l, g, n), C=r(b, l, g, n),
             A=-torch.empty(h, device=DEV).uniform_(1, 16, generator=gen),
             D=r(h, p, dt=torch.float32) if D_hdim else r(h, dt=torch.float32),
             dt_bias=torch.empty(h, device=DEV).uniform_(*bias, generator=gen))
    if z:
        t["z"] = r(b, l, h, p)
    if init:
        t["initial_states"] = r(b, h, p, n, dt=torch.float32, scale=0.1)
    return t


def call(t, backend_name="triton", chunk_size=None, **kw):
    from mambakit.ops.dispatch import backend
    from mambakit.ops.ssd import mamba_chunk_scan_combined

    with backend(backend_name):
        return mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size or SMALL["chunk"],
                                         D=t.get("D"), z=t.get("z"), dt_bias=t.get("dt_bias"),
                                         initial_states=t.get("initial_states"), dt_softplus=True, **kw)


def out_and_grads(t, backend_name, cast=None, **kw):
    """Output, final state and every input's gradient for a fixed random loss."""
    leaves = {k: (v if cast is None or not v.is_floating_point() else v.to(cast)).detach().requires_grad_()
              for k, v in t.items()}
    out, final = call(leaves, backend_name, return_final_states=True, **kw)
    gen = torch.Generator(device=DEV).manual_seed(1)
    w_out = torch.randn(out.shape, device=DEV, generator=gen).to(out.dtype)
    w_fin = torch.randn(final.shape, device=DEV, generator=gen)
    names = list(leaves)
    grads = torch.autograd.grad((out.float() * w_out.float()).sum() + (final * w_fin).sum(),
                                [leaves[k] for k in names])
    res = {"out": out.detach(), "final": final.detach()}
    res.update({"d" + k: g for k, g in zip(names, grads)})
    return res


def compare(a, b):
    return {k: rel(a[k], b[k]) for k in b}


def correct_fp32():
    """Triton fp32 vs the PyTorch path fp32, every option on (z, D per headdim, limit, init, groups, seq_idx)."""
    b, l, h = SMALL["fp32"]
    t = make(b, l, h, 64, 128, 2, torch.float32, D_hdim=True, z=True, init=True)
    seq_idx = torch.zeros(b, l, dtype=torch.int32, device=DEV)
    seq_idx[:, l // 3:] = 1
    seq_idx[0, l // 2:] = 2  # at a chunk boundary
    seq_idx[1, 3 * l // 4 - 5:] = 3
    kw = dict(dt_limit=(0.001, 0.1), seq_idx=seq_idx)
    errs = compare(out_and_grads(t, "triton", **kw), out_and_grads(t, "torch", **kw))
    return {"rel_err": errs, "max": max(errs.values()), "ok": max(errs.values()) < 1e-4}


def correct_bf16():
    """Triton bf16 vs the PyTorch path fp32 on the same (bf16-rounded) inputs, at the first goal shape."""
    t = make(*SMALL["bf16"], 64, 128, 1, SMALL["low"], init=True)
    kern = out_and_grads(t, "triton")
    ref = out_and_grads(t, "torch", cast=torch.float32)
    errs = compare(kern, ref)
    return {"rel_err": errs, "max": max(errs.values()), "ok": max(errs.values()) < 1e-2,
            "note": "official bf16 output differs from fp32 by 1.7e-3"}


def long_131k():
    """131072 tokens: one pass vs two halves carrying the state (bf16, b1 h48 p64 n128)."""
    L = SMALL["long_l"]
    t = make(1, L, SMALL["long_h"], 64, 128, 1, SMALL["low"])
    with torch.no_grad():
        out, final = call(t, return_final_states=True)
        half = L // 2
        first = {k: (v[:, :half] if k in ("x", "dt", "B", "C") else v) for k, v in t.items()}
        second = {k: (v[:, half:] if k in ("x", "dt", "B", "C") else v) for k, v in t.items()}
        o1, s1 = call(first, return_final_states=True)
        o2, s2 = call(dict(second, initial_states=s1), return_final_states=True)
        ms = bench_ms(lambda: call(t))
    both = torch.cat([o1, o2], dim=1)
    return {"out_rel_err": rel(both, out), "out_max_abs": float((both.float() - out.float()).abs().max()),
            "final_rel_err": rel(s2, final), "fwd_ms": ms, "official_fwd_ms": 4.42,
            "ok": rel(both, out) < 1e-3 and rel(s2, final) < 1e-3}


def long_1m():
    """1M tokens (the official kernels crash here): one forward vs 8 pieces carrying the state."""
    L, pieces = SMALL["huge_l"], 8
    t = make(1, L, SMALL["long_h"], 64, 128, 1, SMALL["low"])
    with torch.no_grad():
        t0 = time.time()
        out, final = call(t, return_final_states=True)
        if DEV == "cuda":
            torch.cuda.synchronize()
        ms = (time.time() - t0) * 1e3
        finite = bool(torch.isfinite(out).all()) and bool(torch.isfinite(final).all())
        state, errs, step = None, [], L // pieces
        for i in range(pieces):
            piece = {k: (v[:, i * step:(i + 1) * step] if k in ("x", "dt", "B", "C") else v) for k, v in t.items()}
            if state is not None:
                piece["initial_states"] = state
            o, state = call(piece, return_final_states=True)
            errs.append(rel(o, out[:, i * step:(i + 1) * step]))
            del o
    return {"finite": finite, "max_piece_out_rel_err": max(errs), "final_rel_err": rel(state, final),
            "fwd_ms_first_call": ms, "ok": finite and max(errs) < 1e-3}


def state_blocks(blk):
    """Run the state kernels with the plan overrides ``blk`` (TIME_SPLIT, BLOCK_N, num_stages ...)."""
    from mambakit.ops.ssd import triton_path

    return triton_path.overridden_blocks(("state_fwd", "state_bwd"), **blk)


def split_correct():
    """b1 l65536 h48 with slowly decaying states (so the time split's corrections matter), initial state and
    packed sequences (one boundary at a part boundary): fp32 and bf16, split (default plan) vs unsplit, all
    against the unsplit fp32 kernels."""
    from mambakit.ops.ssd.state_passing import state_plan

    sh = SMALL["split"]
    L = sh["l"]
    nchunks = -(-L // SMALL["chunk"])
    plan = state_plan(SMALL["chunk"], sh["b"], sh["h"], sh["p"], sh["n"], nchunks, {}, SMALL["low"],
                      torch.device(DEV))
    seq_idx = torch.zeros(sh["b"], L, dtype=torch.int32, device=DEV)
    # one boundary at the last part boundary (a reset there leaves nothing to carry, the others must carry)
    last_part = (plan["parts"] - 1) * plan["chunks_per_part"] * SMALL["chunk"]
    for i, pos in enumerate(sorted((last_part, L // 3 + 7, L - L // 9 + 1))):
        seq_idx[:, pos:] = i + 1
    # activations in low precision, A / D / dt_bias / initial state fp32; the fp32 runs see the same values
    t = make(**sh, dtype=SMALL["low"], z=True, init=True, bias=(-8, -6))
    kw = dict(seq_idx=seq_idx)
    with state_blocks(dict(TIME_SPLIT=1)):
        ref = out_and_grads(t, "triton", cast=torch.float32, **kw)
        whole16 = compare(out_and_grads(t, "triton", **kw), ref)
    split32 = compare(out_and_grads(t, "triton", cast=torch.float32, **kw), ref)
    split16 = compare(out_and_grads(t, "triton", **kw), ref)
    worst16 = max(split16[k] / (whole16[k] + 1e-4) for k in split16)
    return {"parts": plan["parts"], "fp32_split_rel_err": split32, "low_split_rel_err": split16,
            "low_whole_rel_err": whole16, "max_fp32": max(split32.values()), "max_low_ratio": worst16,
            "ok": max(split32.values()) < 1e-4 and worst16 < 2.0}


def _state_stage_ms(blk, bias=(-4, -2)):
    """state_fwd and state_bwd alone (with their passes B and C) at the split shape under the plan ``blk``."""
    from mambakit.ops.ssd.chunk_cumsum import chunk_cumsum_fwd
    from mambakit.ops.ssd.state_passing import state_bwd, state_fwd

    t = make(**SMALL["split"], dtype=SMALL["low"], bias=bias)
    Q = SMALL["chunk"]
    dt_p, dA_cs = chunk_cumsum_fwd(t["dt"], t["A"], t["dt_bias"], True, (0.0, math.inf), False, Q)
    states, _ = state_fwd(t["x"], t["B"], dt_p, dA_cs, None, None, Q, t["x"].dtype, dict(blk))
    dy = torch.randn_like(t["x"])
    return (bench_ms(lambda: state_fwd(t["x"], t["B"], dt_p, dA_cs, None, None, Q, t["x"].dtype, dict(blk))),
            bench_ms(lambda: state_bwd(dy, t["C"], dA_cs, states, None, None, Q, dict(blk))))


def time_split():
    """At the split shape (b1 l65536 h48): state_fwd, state_bwd, fwd and fwd+bwd for the old plan, the unsplit
    kernel with 3 stages, the default plan, P parts forced, and P=8 with 3 stages; then the default plan's
    state stages with slowly decaying states (every chunk corrected: pass C's worst case)."""
    from mambakit.ops.ssd.state_passing import state_plan

    sh = SMALL["split"]
    nchunks = -(-sh["l"] // SMALL["chunk"])
    configs = dict(SPLIT_CONFIGS)
    configs.update({f"P{p}": dict(TIME_SPLIT=p) for p in SMALL["parts"]})
    configs[f"P{SMALL['parts'][1]} st3"] = dict(TIME_SPLIT=SMALL["parts"][1], num_stages=3)
    res = {}
    for name, blk in configs.items():
        plan = state_plan(SMALL["chunk"], sh["b"], sh["h"], sh["p"], sh["n"], nchunks, dict(blk), SMALL["low"],
                          torch.device(DEV))
        sf, sb = _state_stage_ms(blk)
        with state_blocks(blk):
            f, fb = _bench_shape(sh)
        res[name] = {"state_fwd_ms": sf, "state_bwd_ms": sb, "fwd_ms": f, "fwd_bwd_ms": fb,
                     "plan": {k: plan[k] for k in ("parts", "BLOCK_N", "num_stages")}}
        print(f"  {name}: {res[name]}", flush=True)
    sf, sb = _state_stage_ms({}, bias=(-8, -6))
    res["default slow decay"] = {"state_fwd_ms": sf, "state_bwd_ms": sb}
    return res


def _bench_shape(shape, n_rep=None):
    """Median ms of forward and forward+backward (gradients of x, dt, A, B, C, D, dt_bias)."""
    t = make(**shape, dtype=SMALL["low"])
    leaves = {k: v.detach().requires_grad_() for k, v in t.items()}
    dout = torch.randn_like(t["x"])
    names = list(leaves)

    def fwd():
        with torch.no_grad():
            call(t)

    def fwd_bwd():
        out = call(leaves)
        torch.autograd.grad(out, [leaves[k] for k in names], dout)

    return bench_ms(fwd), bench_ms(fwd_bwd)


def bench():
    res = {}
    for shape, off_f, goal_f, off_fb, goal_fb in GOALS:
        key = "b{b} l{l} h{h} p{p} n{n} g{g}".format(**shape)
        f, fb = _bench_shape(shape)
        res[key] = {"fwd_ms": f, "fwd_bwd_ms": fb, "official_fwd_ms": off_f, "goal_fwd_ms": goal_f,
                    "official_fwd_bwd_ms": off_fb, "goal_fwd_bwd_ms": goal_fb}
        print(f"  {key}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)
    return res


def _stage_calls(shape):
    """One closure per stage (taking its block dict), on the intermediate tensors of a real forward/backward."""
    from mambakit.ops.ssd.chunk_cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
    from mambakit.ops.ssd.chunk_scan import chunk_scan_bwd_dbc, chunk_scan_bwd_dx, chunk_scan_fwd
    from mambakit.ops.ssd.state_passing import state_bwd, state_fwd

    t = make(**shape, dtype=SMALL["low"])
    x, dt, A, B, C, D, bias = (t[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias"))
    Q, lim = SMALL["chunk"], (0.0, math.inf)
    dt_p, dA_cs = chunk_cumsum_fwd(dt, A, bias, True, lim, False, Q)
    states, _ = state_fwd(x, B, dt_p, dA_cs, None, None, Q, x.dtype)
    dy = torch.randn_like(x)
    dstates, _, sp = state_bwd(dy, C, dA_cs, states, None, None, Q)
    _, ddt_dir, f, _ = chunk_scan_bwd_dx(x, B, C, dt_p, dA_cs, dstates, dy, D, None, Q)
    _, _, e, rows, cols = chunk_scan_bwd_dbc(x, B, C, dt_p, dA_cs, states, dstates, dy, None, Q)
    return {
        "cumsum_fwd": lambda blk: chunk_cumsum_fwd(dt, A, bias, True, lim, False, Q),
        "state_fwd": lambda blk: state_fwd(x, B, dt_p, dA_cs, None, None, Q, x.dtype, blk),
        "scan_fwd": lambda blk: chunk_scan_fwd(x, B, C, dt_p, dA_cs, states, D, None, None, Q, blk),
        "state_bwd": lambda blk: state_bwd(dy, C, dA_cs, states, None, None, Q, blk),
        "scan_bwd_dx": lambda blk: chunk_scan_bwd_dx(x, B, C, dt_p, dA_cs, dstates, dy, D, None, Q, blk),
        "scan_bwd_dbc": lambda blk: chunk_scan_bwd_dbc(x, B, C, dt_p, dA_cs, states, dstates, dy, None, Q, blk),
        "cumsum_bwd": lambda blk: chunk_cumsum_bwd(ddt_dir, f, e, rows, cols, sp, dt_p, dt, A, bias, True, lim,
                                                   False, Q),
    }


def stages_and_variants():
    """Per-stage medians for every goal shape and every block variant (time budget permitting)."""
    res = {}
    for shape, *_ in GOALS:
        key = "b{b} l{l} h{h} p{p} n{n} g{g}".format(**shape)
        if STAGE_SHAPES and not any(key.startswith(k + " ") for k in STAGE_SHAPES):
            continue
        calls = _stage_calls(shape)
        res[key] = {}
        for stage, fn in calls.items():
            variants = VARIANTS.get(stage, [dict()])
            timings = []
            for blk in variants:
                if time.time() - T0 > STAGE_BUDGET and blk:  # keep the whole script under ~2 minutes
                    continue
                try:
                    timings.append((bench_ms(lambda: fn(dict(blk))), blk))
                except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is reported
                    timings.append((float("inf"), dict(blk, error=f"{type(exc).__name__}: {exc}"[:200])))
            best = min(timings, key=lambda tb: tb[0])
            res[key][stage] = {"default_ms": timings[0][0], "best_ms": best[0], "best_blocks": best[1],
                               "all": [(round(ms, 4), blk) for ms, blk in timings]}
        fwd = sum(res[key][s]["default_ms"] for s in ("cumsum_fwd", "state_fwd", "scan_fwd"))
        res[key]["sum_fwd_default_ms"] = fwd
        res[key]["sum_fwd_best_ms"] = sum(res[key][s]["best_ms"] for s in ("cumsum_fwd", "state_fwd", "scan_fwd"))
        del calls
    return res


# whole forward (and fwd+bwd) at the goal shapes under combinations of state_fwd and scan_fwd blocks: the
# scan with two heads a program (HEADS=2, sharing the C B^T dot), the state kernel split in time or with longer
# source blocks. Each combination's output is compared with the default's and with the fp32 PyTorch path.
# Measured (notes/gpu_run8/call1, H200, fwd ms): scan HEADS=2 no gain (b8 0.695 vs 0.694); state BLOCK_K 128:
# b8 0.694 -> 0.615, b4 0.399 -> 0.360; state BLOCK_N 32 / 3 stages 0.672; state split in 2 parts 0.729.
# (state_fwd blocks, scan_fwd blocks, state_bwd blocks); FWD_BWD: also time forward + backward
FWD_COMBOS = {
    "default": ({}, {}, {}),
    "sf K128": (dict(BLOCK_K=128), {}, {}),
    "sf K256": (dict(BLOCK_K=256), {}, {}),
    "sf K128 st3": (dict(BLOCK_K=128, num_stages=3), {}, {}),
    "sf K128 w8": (dict(BLOCK_K=128, num_warps=8), {}, {}),
    "sf K256 w8": (dict(BLOCK_K=256, num_warps=8), {}, {}),
    "sf K128 N32 st3": (dict(BLOCK_K=128, BLOCK_N=32, num_stages=3), {}, {}),
    "sf K128 P32 N128": (dict(BLOCK_K=128, BLOCK_P=32, BLOCK_N=128), {}, {}),
    "sf+sb K128": (dict(BLOCK_K=128), {}, dict(BLOCK_K=128)),
    "sf+sb K256 w8": (dict(BLOCK_K=256, num_warps=8), {}, dict(BLOCK_K=256, num_warps=8)),
}
FWD_BWD = ("default", "sf K128", "sf+sb K128", "sf+sb K256 w8")
FWD_COMBO_SHAPES = ("b8", "b4", "b1")


def _no_grad_call(t):
    with torch.no_grad():
        return call(t)


def fwd_variants():
    from mambakit.ops.ssd import triton_path

    res = {}
    for shape, off_f, goal_f, *_ in GOALS:
        key = "b{b} l{l} h{h} p{p} n{n} g{g}".format(**shape)
        if not any(key.startswith(k + " ") for k in FWD_COMBO_SHAPES):
            continue
        t = make(**shape, dtype=SMALL["low"])
        with torch.no_grad():
            ref = call({k: v.float() if v.is_floating_point() else v for k, v in t.items()}, "torch")
            base = call(t)
        res[key] = {"official_fwd_ms": off_f, "goal_fwd_ms": goal_f}
        base_grads = None
        for name, (st, sc, sb) in FWD_COMBOS.items():
            try:
                with triton_path.overridden_blocks(("state_fwd",), **st), \
                        triton_path.overridden_blocks(("scan_fwd",), **sc), \
                        triton_path.overridden_blocks(("state_bwd",), **sb):
                    with torch.no_grad():
                        out = call(t)
                    r = {"fwd_ms": bench_ms(lambda: _no_grad_call(t)),
                         "rel_err_vs_default": rel(out, base), "rel_err_vs_fp32": rel(out, ref)}
                    if name in FWD_BWD:
                        r["fwd_bwd_ms"] = _bench_shape(shape)[1]
                    if sb:  # a backward variant: every gradient against the default blocks'
                        got = out_and_grads(t, "triton")
                        if base_grads is None:
                            raise RuntimeError("the default combination must come first")
                        r["grad_rel_err_vs_default"] = max(rel(got[k], base_grads[k]) for k in got)
                    elif name == "default":
                        base_grads = out_and_grads(t, "triton")
            except Exception as exc:  # noqa: BLE001 - reported, the other combinations still run
                r = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            res[key][name] = r
            print(f"  {key} {name}: {r}", flush=True)
        del t
    return res


def dbc_blocks(blk):
    """Run the dB / dC backward (chunk_scan_bwd_dbc) with the blocks ``blk`` (VARIANT, tile sizes)."""
    from mambakit.ops.ssd import triton_path

    return triton_path.overridden_blocks(("scan_bwd_dbc",), **blk)


def _dbc_check(shape, dtype, seed):
    """Every gradient of each DBC_CONFIGS entry vs the default, and both vs the fp32 PyTorch path; packed
    sequences, initial state, z, D per headdim, groups."""
    b, l = shape["b"], shape["l"]
    t = make(**shape, dtype=dtype, D_hdim=True, z=True, init=True, seed=seed)
    seq_idx = torch.zeros(b, l, dtype=torch.int32, device=DEV)
    seq_idx[:, l // 3 + 7:] = 1
    seq_idx[0, l // 2:] = 2  # at a chunk boundary
    kw = dict(seq_idx=seq_idx)
    ref = out_and_grads(t, "torch", cast=torch.float32, **kw)
    with dbc_blocks({}):
        default = out_and_grads(t, "triton", **kw)
    err_default = compare(default, ref)
    res = {"default_vs_ref": err_default}
    for name, blk in DBC_CONFIGS.items():
        if name == "default":
            continue
        with dbc_blocks(blk):
            got = out_and_grads(t, "triton", **kw)
        err = compare(got, ref)
        ratio = max(err[k] / (err_default[k] + (1e-6 if dtype == torch.float32 else 1e-4)) for k in err)
        res[name] = {"vs_default": compare(got, default), "vs_ref": err, "max_ratio": ratio}
        del got
    return res


def dbc_variants():
    """dB / dC backward variants (DBC_CONFIGS): gradients against the default (bf16 with groups, seq_idx,
    initial state; fp32 too), then chunk_scan_bwd_dbc alone and fwd+bwd at SMALL["dbc_shapes"]."""
    res = {"check_low": _dbc_check(SMALL["dbc_check"], SMALL["low"], 5),
           "check_fp32": _dbc_check(SMALL["dbc_check32"], torch.float32, 6)}
    checks = [r for c in ("check_low", "check_fp32") for n, r in res[c].items() if n != "default_vs_ref"]
    res["ok"] = all(r["max_ratio"] < 2.0 for r in checks)
    res["timing"] = {}
    for shape in SMALL["dbc_shapes"]:
        key = "b{b} l{l} h{h} p{p} n{n} g{g}".format(**shape)
        stage = _stage_calls(shape)["scan_bwd_dbc"]
        rows = {}
        for name, blk in DBC_CONFIGS.items():
            try:
                dbc_ms = bench_ms(lambda: stage(dict(blk)))
                with dbc_blocks(blk):
                    f, fb = _bench_shape(shape)
                rows[name] = {"dbc_ms": dbc_ms, "fwd_bwd_ms": fb, "fwd_ms": f}
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile is reported
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            print(f"  {key} {name}: {rows[name]}", flush=True)
        res["timing"][key] = rows
        del stage
    return res


def _dbc_table(r) -> list:
    if "error" in r:
        return [f"dbc_variants ERROR {r['error'][:150]}"]
    lines = [f"dbc_variants   {'ok  ' if r['ok'] else 'FAIL'} gradient error vs fp32 torch, variant / default "
             f"(max over gradients; ok < 2):"]
    for c in ("check_low", "check_fp32"):
        lines.append(f"  {c}: " + ", ".join(f"{n} {v['max_ratio']:.2f} (vs default max "
                                             f"{max(v['vs_default'].values()):.1e})"
                                             for n, v in r[c].items() if n != "default_vs_ref"))
    lines.append(f"  {'shape':28s} {'config':14s} {'dbc ms':>8s} {'f+b ms':>8s} {'fwd ms':>8s}")
    for key, rows in r["timing"].items():
        for name, v in rows.items():
            if "error" in v:
                lines.append(f"  {key:28s} {name:14s} ERROR {v['error'][:100]}")
            else:
                lines.append(f"  {key:28s} {name:14s} {v['dbc_ms']:8.3f} {v['fwd_bwd_ms']:8.3f} {v['fwd_ms']:8.3f}")
    return lines


def _shrink():
    """--smoke: tiny shapes everywhere (heads, headdim and dstate stay those of the goal shapes)."""
    SMALL.update(long_l=96, huge_l=256, long_h=2, fp32=(2, 80, 4), bf16=(1, 48, 4), chunk=16,
                 split=dict(b=1, l=16 * 12 + 5, h=2, p=16, n=16, g=1), parts=(2, 3, 4),
                 dbc_shapes=[dict(b=1, l=16 * 3 + 5, h=2, p=16, n=16, g=1)],
                 dbc_check=dict(b=2, l=16 * 3 + 5, h=4, p=16, n=16, g=2),
                 dbc_check32=dict(b=2, l=16 * 2 + 3, h=2, p=16, n=16, g=2))
    for name in list(DBC_CONFIGS)[3:]:
        del DBC_CONFIGS[name]
    if not torch.cuda.is_available():  # Triton 3.9's interpreter gets bf16 dots wrong; fp16 is fine
        SMALL["low"] = torch.float16
    GOALS[:] = [(dict(b=1, l=40, h=2, p=64, n=128, g=1), *g[1:]) for g in GOALS[:1]]
    for v in VARIANTS.values():
        del v[2:]
    global FWD_COMBO_SHAPES
    FWD_COMBO_SHAPES = ("b1",)
    for name in list(FWD_COMBOS)[2:-2]:
        del FWD_COMBOS[name]


def table() -> str:
    lines = ["", f"=== mambakit SSD (mamba_chunk_scan_combined) on {RESULTS.get('device')} ==="]
    for name in ("correct_fp32", "correct_bf16", "split_correct", "long_131k", "long_1m"):
        r = RESULTS.get(name)
        if r is None:  # skipped
            continue
        if "error" in r:
            lines.append(f"{name:14s} ERROR {r['error'][:150]}")
        elif name == "split_correct":
            worst = max(r["low_split_rel_err"], key=lambda k: r["low_split_rel_err"][k])
            lines.append(f"{name:14s} {'ok  ' if r['ok'] else 'FAIL'} P={r['parts']} fp32 split vs whole max "
                         f"{r['max_fp32']:.2e}; low split/whole err ratio max {r['max_low_ratio']:.2f} (worst "
                         f"{worst}: {r['low_split_rel_err'][worst]:.2e} vs {r['low_whole_rel_err'][worst]:.2e})")
        elif name.startswith("correct"):
            worst = max(r["rel_err"], key=r["rel_err"].get)
            lines.append(f"{name:14s} {'ok  ' if r['ok'] else 'FAIL'} max rel err {r['max']:.2e} ({worst})")
        else:
            extra = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items() if k != "ok"}
            lines.append(f"{name:14s} {'ok  ' if r.get('ok') else 'FAIL'} {extra}")
    b = RESULTS.get("bench", {})
    st = RESULTS.get("stages_and_variants", {})
    lines.append(f"{'shape':30s} {'fwd ms':>8s} {'goal':>6s} {'official':>8s} | {'f+b ms':>8s} {'goal':>6s} "
                 f"{'official':>8s} | fwd best-blocks sum")
    if "error" in b:
        lines.append(f"bench ERROR {b['error'][:150]}")
    else:
        for key, r in b.items():
            best = st.get(key, {}).get("sum_fwd_best_ms", float("nan"))
            lines.append(f"{key:30s} {r['fwd_ms']:8.3f} {r['goal_fwd_ms']:6.2f} {r['official_fwd_ms']:8.3f} | "
                         f"{r['fwd_bwd_ms']:8.3f} {r['goal_fwd_bwd_ms']:6.2f} {r['official_fwd_bwd_ms']:8.3f} | "
                         f"{best:.3f}")
    ts = RESULTS.get("time_split", {})
    if "error" in ts:
        lines.append(f"time_split ERROR {ts['error'][:150]}")
    elif ts:
        lines.append(f"time split at {RESULTS.get('_split_key', 'split shape')}: {'plan':22s} {'st_fwd':>7s} "
                     f"{'st_bwd':>7s} {'fwd':>7s} {'f+b':>7s}")
        for name, r in ts.items():
            plan = " ".join(f"{k}={v}" for k, v in r.get("plan", {}).items())
            lines.append(f"  {name:18s} {plan:28s} {r['state_fwd_ms']:7.3f} {r['state_bwd_ms']:7.3f} "
                         f"{r.get('fwd_ms', float('nan')):7.3f} {r.get('fwd_bwd_ms', float('nan')):7.3f}")
    if isinstance(st, dict) and "error" not in st:
        for key, stages in st.items():
            parts = [f"{s} {v['default_ms']:.3f}->{v['best_ms']:.3f}" for s, v in stages.items() if isinstance(v, dict)]
            lines.append(f"stages {key}: " + ", ".join(parts))
    if "dbc_variants" in RESULTS:
        lines.extend(_dbc_table(RESULTS["dbc_variants"]))
    fv = RESULTS.get("fwd_variants", {})
    if "error" in fv:
        lines.append(f"fwd_variants ERROR {fv['error'][:150]}")
    for key, combos in (fv.items() if "error" not in fv else ()):
        lines.append(f"fwd variants {key} (goal {combos['goal_fwd_ms']}, official {combos['official_fwd_ms']}): "
                     f"{'fwd ms':>7s} {'f+b ms':>7s} {'err/def':>8s} {'err/fp32':>8s}")
        for name, r in combos.items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                lines.append(f"  {name:26s} ERROR {r['error'][:120]}")
                continue
            lines.append(f"  {name:26s} {r['fwd_ms']:7.3f} {r.get('fwd_bwd_ms', float('nan')):7.3f} "
                         f"{r['rel_err_vs_default']:8.1e} {r['rel_err_vs_fp32']:8.1e}"
                         + (f" grads/def {r['grad_rel_err_vs_default']:.1e}" if "grad_rel_err_vs_default" in r else ""))
    lines.append(f"total {time.time() - T0:.0f}s")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".", help="directory for ssd_check.json")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip, e.g. long_1m,stages_and_variants")
    ap.add_argument("--only", default="", help="comma-separated parts to run (all others skipped), e.g. dbc_variants")
    ap.add_argument("--stage-budget", type=float, default=85.0, help="stages_and_variants: seconds of variants")
    ap.add_argument("--stage-shapes", default="", help="stages_and_variants: goal shapes by batch, e.g. b8")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on any device (CPU with TRITON_INTERPRET=1): checks the script, not the GPU")
    args = ap.parse_args(argv)
    global DEV, STAGE_BUDGET, STAGE_SHAPES
    STAGE_BUDGET, STAGE_SHAPES = args.stage_budget, list(filter(None, args.stage_shapes.split(",")))
    if args.smoke:
        _shrink()
        DEV = "cuda" if torch.cuda.is_available() else "cpu"
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke)")
    RESULTS["device"] = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    RESULTS["_split_key"] = "b{b} l{l} h{h} p{p} n{n} g{g}".format(**SMALL["split"])
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    for fn in (correct_fp32, correct_bf16, split_correct, long_131k, long_1m, bench, time_split,
               stages_and_variants, dbc_variants, fwd_variants):
        if fn.__name__ not in skip and (not only or fn.__name__ in only):
            part(fn)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    RESULTS["torch"] = torch.__version__
    import triton

    RESULTS["triton"] = triton.__version__
    (out / "ssd_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print(table())


if __name__ == "__main__":
    main()
