"""GPU timing of the fused decode step's kernels one by one (mambakit.ops.decode), batch 1, fp16.

    python scripts/gpu_bench_decode_ops.py --out $OUT [--budget S]

For the layer shapes of Mamba-1 130m / 2.8b and Mamba-2 130m / 2.7b, each fused op (add + RMSNorm + in_proj
+ conv window, x_proj, the state updates, gated RMSNorm + out_proj) is captured in a CUDA graph of REPS
back-to-back calls, as in a decode step (so programmatic dependent launch overlaps a call with the previous
one, as it does between layers), and the graph is replayed: device microseconds per call (median of replays)
and the weight bytes' rate in TB/s. The same weights through cuBLAS (F.linear) give the unfused reference.
Each GEMV_CONFIG variant is timed in the same run. Every op's output is checked against its reference first.
Prints a table last; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import mambakit.ops.decode as dec
from mambakit.ops.dispatch import backend

REPS = 20
DEVICE = "cuda"
SMOKE = {"m1-130m": dict(kind=1, d=32, di=64, n=4, r=8), "m2-130m": dict(kind=2, d=32, di=64, n=8, hp=16)}
SHAPES = {  # d_model, d_inner, d_state, dt_rank (Mamba-1) / nheads, headdim (Mamba-2)
    "m1-130m": dict(kind=1, d=768, di=1536, n=16, r=48),
    "m2-130m": dict(kind=2, d=768, di=1536, n=128, hp=64),
    "m1-2.8b": dict(kind=1, d=2560, di=5120, n=16, r=160),
    "m2-2.7b": dict(kind=2, d=2560, di=5120, n=128, hp=64),
}
# in_proj's output (compared) does not depend on the conv window it shifts, so fused and reference runs agree
VARIANTS = {"default": {}, "el4096": dict(elements=4096), "el16384": dict(elements=16384),
            "el32768": dict(elements=32768), "pps1": dict(whole_programs_per_sm=1),
            "pps4": dict(whole_programs_per_sm=4), "pps8": dict(whole_programs_per_sm=8),
            "warps8": dict(num_warps=8), "no_pdl": dict(pdl=False), "dot": dict(kernel="dot")}  # GEMV_CONFIG edits


def rnd(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).half()


def layer_ops(s: dict) -> dict:
    """name -> (fused op, reference op, weight bytes) for one layer shape; the ops take no arguments."""
    d, di, n = s["d"], s["di"], s["n"]
    x, res, nw = rnd(1, d), rnd(1, d), rnd(d, scale=0.1) + 1
    ops = {}
    if s["kind"] == 1:
        w_in, conv_w, conv_b = rnd(2 * di, d, scale=d ** -0.5), rnd(di, 4, scale=0.5), rnd(di)
        win = rnd(1, di, 4)
        w_x, w_dt, w_out = rnd(s["r"] + 2 * n, di, scale=di ** -0.5), rnd(di, s["r"], scale=0.1), rnd(d, di, scale=di ** -0.5)
        y, xc = rnd(1, di), rnd(1, di)
        x_dbl = rnd(1, s["r"] + 2 * n)
        state = torch.randn(1, di, n, device=DEVICE).half()
        A = -torch.rand(di, n, device=DEVICE) - 0.5
        D, bias = torch.randn(di, device=DEVICE), torch.randn(di, device=DEVICE) * 0.1
        z = rnd(1, di)
        conv = dict(conv_state=win, conv_start=0, conv_weight=conv_w, conv_bias=conv_b)
        ops["in_proj"] = (lambda: dec.norm_linear(x, w_in, nw, 1e-5, residual=res, **conv),
                          lambda: dec.norm_linear_ref(x, w_in, nw, 1e-5, residual=res, **conv), w_in)
        ops["x_proj"] = (lambda: dec.linear(xc, w_x), lambda: F.linear(xc, w_x), w_x)
        # the state updates change their state in place: test_decode.py checks them, this only times them (back to
        # back on one state, with decode.EARLY_STATE a call may read the state before the previous call's write:
        # the timing holds, the values do not; a decode step never runs two updates of one state in a row)
        ops["m1_update"] = (lambda: dec.mamba1_state_update(xc, x_dbl, w_dt, bias, state, A, D, z), None, w_dt)
        ops["out_proj"] = (lambda: dec.linear(y, w_out), lambda: F.linear(y, w_out), w_out)
    else:
        h, p, g = di // s["hp"], s["hp"], 1
        conv_dim = di + 2 * g * n
        w_in = rnd(2 * di + 2 * g * n + h, d, scale=d ** -0.5)
        conv_w, conv_b, win = rnd(conv_dim, 4, scale=0.5), rnd(conv_dim), rnd(1, 4, conv_dim).transpose(1, 2)
        zxbcdt, xbc = rnd(1, w_in.shape[0]), rnd(1, conv_dim)
        state = torch.randn(1, h, p, n, device=DEVICE).half()
        A, D, dtb = -torch.rand(h, device=DEVICE) - 0.5, torch.randn(h, device=DEVICE), torch.randn(h, device=DEVICE) * 0.1
        y, z, nw2, w_out = rnd(1, di), rnd(1, di), rnd(di, scale=0.1) + 1, rnd(d, di, scale=di ** -0.5)
        conv = dict(conv_state=win, conv_start=di, conv_weight=conv_w, conv_bias=conv_b)
        upd = lambda: dec.mamba2_state_update(zxbcdt, xbc, state, A, D, dtb, (0.0, float("inf")), g,  # noqa: E731
                                              dt_start=di + conv_dim)
        ops["in_proj"] = (lambda: dec.norm_linear(x, w_in, nw, 1e-5, residual=res, **conv),
                          lambda: dec.norm_linear_ref(x, w_in, nw, 1e-5, residual=res, **conv), w_in)
        ops["m2_update"] = (upd, None, None)
        ops["out_proj"] = (lambda: dec.gated_norm_linear(y, z, nw2, 1e-5, di, False, w_out),
                           lambda: dec.gated_norm_linear_ref(y, z, nw2, 1e-5, di, False, w_out), w_out)
    return ops


def graph_us(fn) -> float:
    """Device microseconds per call: a CUDA graph of REPS calls, replayed; median of 15 replays."""
    fn()
    if DEVICE != "cuda":  # --smoke: the call ran, nothing to time
        return 0.0
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        with torch.cuda.graph(g, stream=s):
            for _ in range(REPS):
                fn()
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / REPS)
    return statistics.median(times)


def check_and_reference(r: dict, name: str, fused, ref, w) -> None:
    """The fused op's output against its reference (relative L2), and cuBLAS's time for a linear's weight."""
    if ref is None:
        return
    out, want = first(fused()), first(ref())
    r["rel_err"] = float((out.float() - want.float()).norm() / want.float().norm())
    if name.endswith("proj"):
        xin = rnd(1, w.shape[1])
        r["cublas_us"] = graph_us(lambda: F.linear(xin, w))


def first(t):
    return t[0] if isinstance(t, tuple) else t


# --sweep: the large layers' GEMVs (Mamba-2 2.7b's in_proj with its norm and conv window, its gated norm +
# out_proj, the plain out_proj / x_proj of Mamba-1 2.8b) over whole-kernel tiles (split: a row as two
# power-of-two tiles; elements a program; warps) and dot-kernel tiles. Each call of the graph reads another
# copy of the weight (at least L2_BYTES of copies), as a decode step reads 64 layers' weights, so the rates are
# HBM rates, not L2 ones (the default sweep above reuses one weight and overstates the 26 MB out_proj).
L2_BYTES = 200e6
SWEEP_SHAPES = {  # kind, n, k (, the conv window's first column and width)
    "m2-2.7b in_proj": (1, 10576, 2560, 5120, 5376), "m2-2.7b out_proj": (2, 2560, 5120),
    "out_proj plain": (0, 2560, 5120), "m1-2.8b in_proj": (1, 10240, 2560, 0, 5120), "m1-2.8b x_proj": (0, 192, 5120)}
# gpu_run9/call1 swept split x elements 8192-65536 x 4/8 warps and 4 dot tilings (split, 32768, 4 warps won at
# every large shape); call3 the persistent "loop" kernel over elements x programs an SM (it won at K = 5120 with
# 16384 and 4, lost at 2560), now the default for K > loop_min_k; {} is the default, loop_min_k None call1's
SWEEP = [{}, dict(loop_min_k=None), dict(kernel="loop", loop_elements=32768, loop_programs_per_sm=4),
         dict(kernel="loop", loop_elements=16384, loop_programs_per_sm=8)]
SMOKE_SWEEP = {"m2 in_proj": (1, 40, 48, 10, 20), "m2 out_proj": (2, 24, 48), "plain": (0, 24, 40)}


def sweep_ops(kind: int, n: int, k: int, c0: int = 0, c: int = 0):
    """(fused call of weight copy i, cuBLAS call of copy i, copies, reference call) for one GEMV shape.
    kind 0: plain linear; 1: add + RMSNorm + linear, output columns c0 .. c0 + c entering a conv window
    (in_proj); 2: gated RMSNorm + linear (Mamba-2's out_proj)."""
    copies = max(1, min(REPS, int(-(-L2_BYTES // (n * k * 2)))))
    ws = [rnd(n, k, scale=k ** -0.5) for _ in range(copies)]
    x, res, z, nw = rnd(1, k), rnd(1, k), rnd(1, k), rnd(k, scale=0.1) + 1
    if kind == 1:
        conv = dict(conv_state=rnd(1, c, 4), conv_start=c0, conv_weight=rnd(c, 4, scale=0.5), conv_bias=rnd(c))
        fused = lambda i: dec.norm_linear(x, ws[i], nw, 1e-5, residual=res, **conv)  # noqa: E731
        ref = lambda i: dec.norm_linear_ref(x, ws[i], nw, 1e-5, residual=res, **conv)  # noqa: E731
    elif kind == 2:
        fused = lambda i: dec.gated_norm_linear(x, z, nw, 1e-5, k, False, ws[i])  # noqa: E731
        ref = lambda i: dec.gated_norm_linear_ref(x, z, nw, 1e-5, k, False, ws[i])  # noqa: E731
    else:
        fused = lambda i: dec.linear(x, ws[i])  # noqa: E731
        ref = lambda i: F.linear(x, ws[i])  # noqa: E731
    return fused, (lambda i: F.linear(x, ws[i])), copies, ref


def graph_us_rotating(fn, copies: int) -> float:
    """graph_us over calls that cycle through the weight copies."""
    calls = iter(range(1 << 30))
    return graph_us(lambda: fn(next(calls) % copies))


def sweep(args) -> int:
    start = time.perf_counter()
    shapes = SMOKE_SWEEP if DEVICE == "cpu" else SWEEP_SHAPES
    variants = SWEEP
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)", "reps": REPS,
               "sweep": {}}
    base = dict(dec.GEMV_CONFIG)
    for name, shape in shapes.items():
        fused, cublas, copies, ref = sweep_ops(*shape)
        r = results["sweep"].setdefault(name, {"weight_mb": shape[1] * shape[2] * 2 / 1e6, "copies": copies})
        r["cublas_us"] = graph_us_rotating(cublas, copies)
        for v in variants:
            label = ",".join(f"{a}={b}" for a, b in v.items()) or "default"
            if time.perf_counter() - start > args.budget:
                break
            dec.GEMV_CONFIG.update(v)
            try:
                got, want = first(fused(0)), first(ref(0))
                err = float((got.float() - want.float()).norm() / want.float().norm())
                r[label] = dict(us=graph_us_rotating(fused, copies), rel_err=err)
            except Exception as e:  # noqa: BLE001 (recorded, the sweep goes on)
                r[label] = dict(error=repr(e)[:200])
            finally:
                dec.GEMV_CONFIG.clear()
                dec.GEMV_CONFIG.update(base)
        print(name, {a: b for a, b in r.items()}, flush=True)
    results["seconds"] = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench_decode_ops_sweep.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"{'shape':<18} {'MB':>6} {'cuBLAS us':>9} {'TB/s':>5}  best 4 variants (us, TB/s, rel err)")
    for name, r in results["sweep"].items():
        tbs = lambda us: r["weight_mb"] / us if us else 0.0  # noqa: E731 (MB/us = TB/s)
        got = sorted((v["us"], lab, v["rel_err"]) for lab, v in r.items() if isinstance(v, dict) and "us" in v)
        cells = "; ".join(f"{lab} {us:.2f} {tbs(us):.2f} {e:.1e}" for us, lab, e in got[:4])
        print(f"{name:<18} {r['weight_mb']:6.1f} {r['cublas_us']:9.2f} {tbs(r['cublas_us']):5.2f}  {cells}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="directory for gpu_bench_decode_ops.json")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds after which variants are skipped")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU through Triton's interpreter (run with TRITON_INTERPRET=1)")
    ap.add_argument("--sweep", action="store_true", help="the large layers' GEMV tile sweep (HBM rates) instead")
    args = ap.parse_args(argv)
    global DEVICE, SHAPES
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 in the environment (set before Triton is imported)",
                  file=sys.stderr)
            return 2
        DEVICE, SHAPES = "cpu", SMOKE
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    with backend("triton"):  # the fused kernels (through the interpreter in --smoke)
        return sweep(args) if args.sweep else run(args)


def run(args) -> int:
    start = time.perf_counter()
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)", "reps": REPS, "ops": {}}
    base = dict(dec.GEMV_CONFIG)
    for shape, s in SHAPES.items():
        for name, (fused, ref, w) in layer_ops(s).items():
            key = f"{shape} {name}"
            r = results["ops"].setdefault(key, {"weight_mb": 0 if w is None else w.numel() * 2 / 1e6})
            try:
                check_and_reference(r, name, fused, ref, w)
            except Exception as e:  # noqa: BLE001 (recorded, the sweep goes on)
                r["error"] = repr(e)[:300]
            for label, v in VARIANTS.items():
                if v and time.perf_counter() - start > args.budget:
                    break
                dec.GEMV_CONFIG.update(v)
                try:
                    r[label] = graph_us(fused)
                except Exception as e:  # noqa: BLE001 (recorded, the sweep goes on)
                    r[label] = f"error: {e!r}"[:200]
                finally:
                    dec.GEMV_CONFIG.clear()
                    dec.GEMV_CONFIG.update(base)
            print(key, {k: (round(x, 2) if isinstance(x, float) else x) for k, x in r.items()}, flush=True)
    results["seconds"] = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench_decode_ops.json"), "w") as f:
        json.dump(results, f, indent=2)
    cols = list(VARIANTS)
    print(f"{'op':<18} {'MB':>6} {'cuBLAS':>7} " + " ".join(f"{c:>8}" for c in cols) + "   (us/call, b1 fp16)")
    for key, r in results["ops"].items():
        cells = [f"{r[c]:8.2f}" if isinstance(r.get(c), float) else f"{'-':>8}" for c in cols]
        cub = f"{r['cublas_us']:7.2f}" if "cublas_us" in r else f"{'-':>7}"
        print(f"{key:<18} {r['weight_mb']:6.1f} {cub} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
