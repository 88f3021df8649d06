"""GPU check of the causal conv1d and RMSNorm kernels: correctness at full size, then speed.

    python scripts/gpu_check_conv_norm.py --out $OUT

1. correctness: Triton vs the PyTorch path (fp32 math, same bf16 inputs), relative L2 of outputs and grads;
2. speed: medians of triton.testing.do_bench, GB/s of the minimum bytes (every input read once, every output
   written once) and their share of a device-to-device copy measured here;
3. a block-size sweep of the conv kernels (skipped when the time budget runs short);
4. conv_fwd_variants: the forward variants of causal_conv1d.FWD_VARIANT / FWD_BLOCKS side by side (old "tile"
   and the new ones) at b4 d3072 l4096 and b1 d3328 l65536, w4 SiLU bf16, both layouts: each checked against
   the PyTorch path on the GPU, then timed as medians of CUDA-event timings, per call with L2 flushed before
   each (like do_bench) and per call inside a CUDA graph of 20 calls (device time only, no host overhead).
   Runs first, so that the budget never skips it; --only conv_fwd_variants runs it alone.
Each part runs on its own: one failure is recorded and the others go on. JSON goes to --out, the summary
table is printed last. Official anchors (H100, causal-conv1d 1.6.1 CUDA): conv fwd b4 d3072 l4096 w4 SiLU
0.0754 ms, b1 d3328 l65536 0.322 ms; PyTorch F.conv1d + SiLU 0.653 ms; copy 3,019 GB/s.
"""

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

try:
    import mambakit  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from triton.testing import do_bench  # noqa: E402

from mambakit.ops import causal_conv1d as cc  # noqa: E402
from mambakit.ops import norms  # noqa: E402
from mambakit.ops.dispatch import backend  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
T0 = time.time()
ROWS = []  # summary table rows
RESULTS = {}


def bench(fn):
    """Median milliseconds of fn."""
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


HOST = []  # (what, host us per call, device us per call)


def host_us(what, fn, device_ms, n=30):
    """Host (CPU) time per call with the GPU left to run behind: when it is close to or above the device time
    the measured time is launch-bound (Python, autograd, Triton's launcher), not kernel-bound."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    HOST.append((what, us, device_ms * 1e3))
    return us


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


ONLY = {}  # {"parts": set of part names, or None for all}


def part(name):
    """Run a section; record its exception instead of stopping."""
    def wrap(fn):
        parts = ONLY.get("parts")
        if parts is not None and name not in parts and name != "copy_bandwidth":
            return fn
        t = time.time()
        try:
            RESULTS[name] = fn()
        except Exception:
            RESULTS[name] = {"error": traceback.format_exc()}
            print(f"[{name}] FAILED\n{RESULTS[name]['error']}", flush=True)
        print(f"[{name}] {time.time() - t:.1f} s (total {time.time() - T0:.1f} s)", flush=True)
        return fn
    return wrap


def row(what, shape, ms, nbytes, copy_gbs, anchor_ms=None):
    gbs = nbytes / ms / 1e6
    ROWS.append((what, shape, ms, gbs, 100 * gbs / copy_gbs if copy_gbs else float("nan"), anchor_ms))
    return {"ms": ms, "GB/s": gbs, "pct_copy": 100 * gbs / copy_gbs if copy_gbs else None, "min_bytes": nbytes}


def conv_inputs(batch, dim, seqlen, channels_last, width=4):
    x = (torch.randn(batch, seqlen, dim, device=DEV, dtype=BF16).transpose(1, 2) if channels_last
         else torch.randn(batch, dim, seqlen, device=DEV, dtype=BF16))
    w = (torch.randn(dim, width, device=DEV) * 0.3).to(BF16)
    b = torch.randn(dim, device=DEV).to(BF16)
    return x, w, b


def layout_name(channels_last):
    return "channels-last" if channels_last else "contiguous"


_FLUSH = []


def event_ms(fn, reps=40, warmup=5):
    """Median ms of fn over reps calls, each between two CUDA events with the L2 cache flushed before it."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 * 2**20 // 4, device=DEV, dtype=torch.int32))  # 256 MiB > any L2
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _FLUSH[0].zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_ms(fn, calls=20, reps=15):
    """Median ms per call of fn replayed `calls` times in one CUDA graph: device time, no launch overhead."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


# (label, variant, FWD_BLOCKS entry or None): "tile" is the kernel measured before (docs/benchmarks.md)
FWD_VARIANTS = {
    "contiguous": [
        ("tile (old default)", "tile", None),
        ("tile 4x512", "tile", dict(blocks=(4, 512), num_warps=4)),
        ("walk (default)", "walk", None),
        ("walk 8x256 s2", "walk", dict(BLOCK_D=8, BLOCK_L=256, STEPS=2, num_warps=4)),
        ("walk 8x256 s4", "walk", dict(BLOCK_D=8, BLOCK_L=256, STEPS=4, num_warps=4)),
        ("walk 8x256 s8", "walk", dict(BLOCK_D=8, BLOCK_L=256, STEPS=8, num_warps=4)),
        ("walk 4x512 s4", "walk", dict(BLOCK_D=4, BLOCK_L=512, STEPS=4, num_warps=4)),
        ("walk 16x256 s4 w8", "walk", dict(BLOCK_D=16, BLOCK_L=256, STEPS=4, num_warps=8)),
        ("walk 4x256 s8 w2", "walk", dict(BLOCK_D=4, BLOCK_L=256, STEPS=8, num_warps=2)),
    ],
    "channels-last": [
        ("tile (default)", "tile", None),
        ("tile 256x64 w1", "tile", dict(blocks=(256, 64), num_warps=1)),
    ],
}


def run_fwd_variant(x, w, b, variant, cfg, seq=None, init=None):
    """_conv_fwd_triton with one variant; cfg either overrides blocks/num_warps ("tile") or replaces the
    variant's FWD_BLOCKS entry for this call."""
    if variant == "tile":
        return cc._conv_fwd_triton(x, w, b, seq, init, "silu", variant="tile", **(cfg or {}))
    key = ("split" if x.stride(2) == 1 else "rows", variant)
    saved = cc.FWD_BLOCKS[key]
    cc.FWD_BLOCKS[key] = cfg or saved
    try:
        return cc._conv_fwd_triton(x, w, b, seq, init, "silu", variant=variant)
    finally:
        cc.FWD_BLOCKS[key] = saved


VROWS = []  # (shape, layout, label, flush us, graph us, % of copy (graph), rel err)


def fwd_variants(budget, cbw):
    """Every forward variant at the issue's shapes: correctness against the PyTorch path, then timings."""
    out = {}
    for bsz, dim, seqlen in ((4, 3072, 4096), (1, 3328, 65536)):
        for cl in (False, True):
            x, w, b = conv_inputs(bsz, dim, seqlen, cl)
            with backend("torch"):
                ref = cc.causal_conv1d_fn(x, w, b, activation="silu")
            # packed sequences and initial states too (the check only, at the b4 shape)
            seq = (torch.arange(seqlen, device=DEV) // 1500).to(torch.int32).expand(bsz, -1).contiguous()
            init = torch.randn(bsz, dim, 3, device=DEV, dtype=BF16)
            if bsz == 4:
                with backend("torch"):
                    ref_si = cc.causal_conv1d_fn(x, w, b, seq_idx=seq, initial_states=init, activation="silu")
            nbytes = 2 * x.numel() * 2
            copy_ms = graph_ms(lambda: torch.empty_like(x).copy_(x))
            shape = f"b{bsz} d{dim} l{seqlen}"
            out[f"{shape} {layout_name(cl)} copy"] = {"graph_ms": copy_ms, "GB/s": nbytes / copy_ms / 1e6}
            VROWS.append((shape, layout_name(cl), "x.copy_ (same bytes)", float("nan"), copy_ms * 1e3,
                          100 * nbytes / copy_ms / 1e6 / cbw if cbw else float("nan"), 0.0))
            for label, variant, cfg in FWD_VARIANTS[layout_name(cl)]:
                key = f"{shape} {layout_name(cl)} {label}"
                if time.time() - T0 > budget:
                    out[key] = "skipped: time budget"
                    continue
                try:
                    y = run_fwd_variant(x, w, b, variant, cfg)
                    err = rel(y, ref)
                    if bsz == 4:
                        err = max(err, rel(run_fwd_variant(x, w, b, variant, cfg, seq, init), ref_si))
                    del y
                    fn = lambda: run_fwd_variant(x, w, b, variant, cfg)  # noqa: E731
                    fl, gr = event_ms(fn), graph_ms(fn)
                except Exception:
                    out[key] = {"error": traceback.format_exc()}
                    print(f"[conv_fwd_variants] {key} FAILED\n{out[key]['error']}", flush=True)
                    continue
                pct = 100 * nbytes / gr / 1e6 / cbw if cbw else float("nan")
                out[key] = {"rel_err": err, "flush_ms": fl, "graph_ms": gr, "GB/s graph": nbytes / gr / 1e6,
                            "pct_copy graph": pct, "cfg": cfg, "variant": variant, "ok": err < 1e-2}
                VROWS.append((shape, layout_name(cl), label, fl * 1e3, gr * 1e3, pct, err))
            if bsz == 4:  # host time per call: launcher alone, the public op, the public op under autograd
                fn = lambda: cc._conv_fwd_triton(x, w, b, None, None, "silu")  # noqa: E731
                host_us(f"conv _conv_fwd_triton {shape} {layout_name(cl)}", fn, event_ms(fn))
                fn = lambda: cc.causal_conv1d_fn(x, w, b, activation="silu")  # noqa: E731
                host_us(f"conv causal_conv1d_fn {shape} {layout_name(cl)}", fn, event_ms(fn))
                xg = x.detach().clone().requires_grad_()
                fn = lambda: cc.causal_conv1d_fn(xg, w, b, activation="silu")  # noqa: E731
                host_us(f"conv causal_conv1d_fn x.requires_grad {shape} {layout_name(cl)}", fn, event_ms(fn))
                del xg
            del x, ref
            ref_si = None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for gpu_check_conv_norm.json")
    ap.add_argument("--budget", type=float, default=55.0,
                    help="seconds after which the remaining variant timings and the sweep are skipped")
    ap.add_argument("--only", default=None,
                    help="comma list of parts to run (copy_bandwidth always runs), e.g. conv_fwd_variants")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this script times the Triton kernels on a GPU (--help for its options)")
        return
    ONLY["parts"] = set(args.only.split(",")) if args.only else None
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["torch"] = torch.__version__
    import triton
    RESULTS["triton"] = triton.__version__
    copy = {"GB/s": None}

    @part("copy_bandwidth")
    def _():
        src = torch.empty(256 * 2**20, device=DEV, dtype=torch.float32)  # 1 GiB
        dst = torch.empty_like(src)
        ms = bench(lambda: dst.copy_(src))
        copy["GB/s"] = 2 * src.numel() * 4 / ms / 1e6
        return copy

    cbw = copy["GB/s"]

    @part("conv_fwd_variants")
    def _():
        return fwd_variants(args.budget, cbw)

    @part("conv_correctness")
    def _():
        out = {}
        for cl in (False, True):
            x, w, b = conv_inputs(4, 3072, 4096, cl)
            seq = (torch.arange(4096, device=DEV) // 1500).to(torch.int32).expand(4, -1).contiguous()
            h = torch.randn(4, 3072, 3, device=DEV, dtype=BF16)
            dy = torch.randn(4, 3072, 4096, device=DEV, dtype=BF16)
            res = {}
            for be in ("torch", "triton"):
                xx, ww, bb, hh = (t.detach().clone().requires_grad_() for t in (x, w, b, h))
                with backend(be):
                    y = cc.causal_conv1d_fn(xx, ww, bb, seq_idx=seq, initial_states=hh, activation="silu")
                y.backward(dy)
                res[be] = [y, xx.grad, ww.grad, bb.grad, hh.grad]
            out[layout_name(cl)] = {n: rel(a, r) for n, a, r in zip(["out", "dx", "dw", "db", "dinit"],
                                                                     res["triton"], res["torch"])}
        state = torch.randn(64, 3072, 4, device=DEV, dtype=BF16)
        xs = torch.randn(64, 3072, device=DEV, dtype=BF16)
        w = torch.randn(3072, 4, device=DEV, dtype=BF16)
        s1, s2 = state.clone(), state.clone()
        with backend("torch"):
            y1 = cc.causal_conv1d_update(xs, s1, w, None, "silu")
        with backend("triton"):
            y2 = cc.causal_conv1d_update(xs, s2, w, None, "silu")
        out["update"] = {"out": rel(y2, y1), "state": rel(s2, s1)}
        return out

    @part("conv_fwd")
    def _():
        out = {}
        for (bsz, dim, seqlen), anchor in (((4, 3072, 4096), 0.0754), ((1, 3328, 65536), 0.322)):
            for cl in (False, True):
                x, w, b = conv_inputs(bsz, dim, seqlen, cl)
                ms = bench(lambda: cc.causal_conv1d_fn(x, w, b, activation="silu"))
                key = f"b{bsz} d{dim} l{seqlen} {layout_name(cl)}"
                out[key] = row("conv fwd", key, ms, 2 * x.numel() * 2, cbw, anchor)
            xc = x.contiguous()
            ms = bench(lambda: F.silu(F.conv1d(xc, w.unsqueeze(1), b, padding=3, groups=dim)[..., :seqlen]))
            out[f"torch F.conv1d b{bsz} d{dim} l{seqlen}"] = row("F.conv1d+silu", f"b{bsz} d{dim} l{seqlen}", ms,
                                                                 2 * x.numel() * 2, cbw)
        seq = (torch.arange(4096, device=DEV) // 1000).to(torch.int32).expand(4, -1).contiguous()
        for cl in (True, False):
            x, w, b = conv_inputs(4, 3072, 4096, cl)
            ms = bench(lambda: cc.causal_conv1d_fn(x, w, b, seq_idx=seq, activation="silu"))
            shape = f"b4 d3072 l4096 {'CL' if cl else 'contiguous'}"
            out[shape + " seq_idx"] = row("conv fwd seq_idx", shape, ms, 2 * x.numel() * 2, cbw)
        x, w, b = conv_inputs(4, 3072, 4096, False)
        ms = bench(lambda: cc.causal_conv1d_fn(x, w, b, activation="silu"))
        out["host us fwd"] = host_us("conv fwd b4 d3072 l4096 contiguous", lambda: cc.causal_conv1d_fn(
            x, w, b, activation="silu"), ms)
        return out

    @part("conv_fwd_bwd")
    def _():
        out = {}
        for cl in (False, True):
            x, w, b = conv_inputs(4, 3072, 4096, cl)
            x.requires_grad_()
            w.requires_grad_()
            b.requires_grad_()
            dy = torch.randn_like(x)

            def step():
                y = cc.causal_conv1d_fn(x, w, b, activation="silu")
                torch.autograd.grad(y, (x, w, b), dy)

            ms = bench(step)
            key = f"b4 d3072 l4096 {layout_name(cl)}"
            out[key] = row("conv fwd+bwd", key, ms, 5 * x.numel() * 2, cbw)  # fwd: x, out; bwd: x, dy, dx
            out[key + " host us"] = host_us(f"conv fwd+bwd {key}", step, ms)
            with torch.no_grad():
                ms_b = bench(lambda: cc._conv_bwd_triton(x, w, b, None, None, dy, "silu"))
            out[key + " bwd only"] = row("conv bwd kernel", key, ms_b, 3 * x.numel() * 2, cbw)
        return out

    @part("conv_update")
    def _():
        out = {}
        for bsz in (1, 64):
            dim = 5120  # Mamba-1 2.8b d_inner
            state = torch.randn(bsz, dim, 4, device=DEV, dtype=BF16)
            x = torch.randn(bsz, dim, device=DEV, dtype=BF16)
            w = torch.randn(dim, 4, device=DEV, dtype=BF16)
            b = torch.randn(dim, device=DEV, dtype=BF16)
            nbytes = x.numel() * 2 * 2 + state.numel() * 2 * 2 + w.numel() * 2
            ms = bench(lambda: cc.causal_conv1d_update(x, state, w, b, "silu"))
            out[f"b{bsz} d{dim} triton"] = row("conv update", f"b{bsz} d{dim}", ms, nbytes, cbw)
            out[f"b{bsz} d{dim} host us"] = host_us(f"conv update b{bsz} d{dim}", lambda: cc.causal_conv1d_update(
                x, state, w, b, "silu"), ms)
            with backend("torch"):
                ms_t = bench(lambda: cc.causal_conv1d_update(x, state, w, b, "silu"))
            out[f"b{bsz} d{dim} torch"] = row("conv update torch", f"b{bsz} d{dim}", ms_t, nbytes, cbw)
        return out

    @part("norm_correctness")
    def _():
        out = {}
        x = torch.randn(8 * 2048, 2560, device=DEV, dtype=BF16)
        r = torch.randn(8 * 2048, 2560, device=DEV, dtype=torch.float32)
        w = 1 + 0.1 * torch.randn(2560, device=DEV)
        dy, dres = torch.randn_like(x), torch.randn_like(r)
        res = {}
        for be in ("torch", "triton"):
            xx, rr, ww = (t.detach().clone().requires_grad_() for t in (x, r, w))
            with backend(be):
                y, s = norms.rms_norm_fn(xx, ww, None, residual=rr, prenorm=True, residual_in_fp32=True, eps=1e-5)
            torch.autograd.backward([y, s], [dy, dres])
            res[be] = [y, s, xx.grad, rr.grad, ww.grad]
        out["rms_norm_fn"] = {n: rel(a, b) for n, a, b in zip(["y", "residual", "dx", "dresidual", "dw"],
                                                               res["triton"], res["torch"])}
        z = torch.randn_like(x)
        res = {}
        for be in ("torch", "triton"):
            xx, zz, ww = (t.detach().clone().requires_grad_() for t in (x, z, w))
            with backend(be):
                y = norms.rmsnorm_fn(xx, ww, None, z=zz, eps=1e-5, group_size=320, norm_before_gate=False)
            y.backward(dy)
            res[be] = [y, xx.grad, zz.grad, ww.grad]
        out["rmsnorm_fn gated"] = {n: rel(a, b) for n, a, b in zip(["y", "dx", "dz", "dw"], res["triton"],
                                                                    res["torch"])}
        return out

    @part("norm_speed")
    def _():
        out = {}
        for hidden in (768, 2560):
            x = torch.randn(8 * 2048, hidden, device=DEV, dtype=BF16)
            r = torch.randn(8 * 2048, hidden, device=DEV, dtype=torch.float32)
            w = torch.ones(hidden, device=DEV)
            nbytes = x.numel() * (2 + 4 + 2 + 4)  # read x, residual; write y, residual_out

            def fused():
                return norms.rms_norm_fn(x, w, None, residual=r, prenorm=True, residual_in_fp32=True, eps=1e-5)

            def unfused():
                with backend("torch"):
                    return fused()

            key = f"(16384, {hidden})"
            out[key + " fused fwd"] = row("rms_norm_fn fused fwd", key, bench(fused), nbytes, cbw)
            out[key + " torch fwd"] = row("rms_norm_fn torch fwd", key, bench(unfused), nbytes, cbw)
            xg, rg, wg = (t.clone().requires_grad_() for t in (x, r, w))
            dy, dres = torch.randn_like(x), torch.randn_like(r)
            for name, be in (("fused", "triton"), ("torch", "torch")):
                def step():
                    with backend(be):
                        y, s = norms.rms_norm_fn(xg, wg, None, residual=rg, prenorm=True, residual_in_fp32=True,
                                                 eps=1e-5)
                    torch.autograd.grad([y, s], [xg, rg, wg], [dy, dres])
                # bwd moves s (fp32), dy, dres in; dx, dresidual out: 16 B/element more
                ms = bench(step)
                out[key + f" {name} fwd+bwd"] = row(f"rms_norm_fn {name} fwd+bwd", key, ms,
                                                    nbytes + x.numel() * 16, cbw)
                if name == "fused":
                    out[key + " fused fwd+bwd host us"] = host_us(f"rms_norm_fn fused fwd+bwd {key}", step, ms)
        x = torch.randn(8 * 2048, 1536, device=DEV, dtype=BF16)
        z = torch.randn_like(x)
        w = torch.ones(1536, device=DEV)
        ms = bench(lambda: norms.rmsnorm_fn(x, w, None, z=z, eps=1e-5, group_size=1536, norm_before_gate=False))
        out["gated (16384, 1536)"] = row("rmsnorm_fn gated fwd", "(16384, 1536)", ms, x.numel() * 6, cbw)
        return out

    @part("conv_sweep")
    def _():
        out = {}
        sweeps = {
            (False, "fwd"): [(8, 256, 4), (16, 256, 4), (4, 512, 4), (16, 512, 8), (32, 128, 4)],
            # channels-last: (BLOCK_D, CHUNK, warps) of the row-walking kernels
            (True, "fwd"): [(256, 64, 2), (128, 64, 1), (512, 64, 4), (256, 32, 2), (256, 128, 2), (256, 64, 4)],
            (False, "bwd"): [(8, 128, 4), (16, 128, 4), (4, 256, 4), (8, 256, 8)],
            (True, "bwd"): [(256, 128, 2), (128, 128, 1), (512, 128, 4), (256, 64, 2), (256, 256, 2)],
        }
        for (cl, direction), configs in sweeps.items():
            x, w, b = conv_inputs(4, 3072, 4096, cl)
            dy = torch.randn_like(x)
            for bd, bl, nw in configs:
                if time.time() - T0 > args.budget:
                    out["skipped"] = "time budget"
                    return out
                if direction == "fwd":
                    fn = lambda: cc._conv_fwd_triton(x, w, b, None, None, "silu", (bd, bl), nw)  # noqa: E731
                    nbytes = 2 * x.numel() * 2
                else:
                    fn = lambda: cc._conv_bwd_triton(x, w, b, None, None, dy, "silu", (bd, bl), nw)  # noqa: E731
                    nbytes = 3 * x.numel() * 2
                ms = bench(fn)
                out[f"{direction} {layout_name(cl)} BLOCK_D={bd} BLOCK_L={bl} warps={nw}"] = {
                    "ms": ms, "GB/s": nbytes / ms / 1e6}
        return out

    with open(os.path.join(args.out, "gpu_check_conv_norm.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    print_summary(cbw)


def print_summary(cbw):
    print("\n=== correctness (rel L2, Triton vs PyTorch path) ===")
    for name in ("conv_correctness", "norm_correctness"):
        r = RESULTS.get(name, {})
        if "error" in r:
            print(f"{name}: FAILED (see JSON)")
            continue
        for k, v in r.items():
            print(f"{name} {k}: " + ", ".join(f"{n}={e:.1e}" for n, e in v.items()))
    sweep = RESULTS.get("conv_sweep", {})
    if sweep and "error" not in sweep:
        print("\n=== conv block sweep (b4 d3072 l4096 bf16) ===")
        for k, v in sweep.items():
            print(f"{k}: {v}" if isinstance(v, str) else f"{k}: {v['ms'] * 1e3:.1f} us {v['GB/s']:.0f} GB/s")
    failed = [k for k, v in RESULTS.items() if isinstance(v, dict) and "error" in v]
    print(f"\n=== speed on {RESULTS.get('device')} (copy {cbw or float('nan'):.0f} GB/s) ===")
    print(f"{'op':28s} {'shape':34s} {'us':>9s} {'GB/s':>7s} {'%copy':>6s} {'official us':>11s}")
    for what, shape, ms, gbs, pct, anchor in ROWS:
        a = f"{anchor * 1e3:.1f}" if anchor else ""
        print(f"{what:28s} {shape:34s} {ms * 1e3:9.1f} {gbs:7.0f} {pct:6.1f} {a:>11s}")
    print("\n=== host time per call (CPU, GPU left running behind) vs device time ===")
    for what, us, dev_us in HOST:
        flag = "  <- launch-bound" if us > 0.8 * dev_us else ""
        print(f"{what:50s} host {us:8.1f} us   device {dev_us:8.1f} us{flag}")
    if VROWS:
        print(f"\n=== conv fwd variants, w4 SiLU bf16 (flush: per call, L2 flushed; graph: 20 calls in a CUDA "
              f"graph; %copy of {cbw or float('nan'):.0f} GB/s from graph) ===")
        print(f"{'shape':18s} {'layout':14s} {'variant':22s} {'flush us':>9s} {'graph us':>9s} {'%copy':>6s} "
              f"{'rel err':>8s}")
        for shape, lay, label, fl, gr, pct, err in VROWS:
            flag = "" if err < 1e-2 else "  WRONG"
            print(f"{shape:18s} {lay:14s} {label:22s} {fl:9.1f} {gr:9.1f} {pct:6.1f} {err:8.1e}{flag}")
    print(f"failed parts: {failed or 'none'}; total {time.time() - T0:.1f} s")


if __name__ == "__main__":
    main()
