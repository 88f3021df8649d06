"""GPU check of the Mamba-1 selective scan and state update: correctness at full size, then timings.

    python scripts/gpu_check_mamba1.py --out OUT_DIR

Sections run in order of importance under a wall-clock budget (--budget seconds, 165 by default: about
170 s on an H200 with compile times); a failing or skipped section never stops the others. Order: correctness
of the defaults and of the new variants (prefetch, time split, cl_copy) at full size; forward timings of the
variants at b4 d3072 l4096 contiguous and channels-last ("cl": u/delta/z with stride 1 along d, as the Mamba
module passes them) and at b1 d3072 l65536; fwd+bwd of the most promising; then the older checks (1M tokens,
state update). Prints a compact table last and writes OUT_DIR/gpu_check_mamba1.json.
Timings: triton.testing.do_bench medians; bf16 u/delta/z/B/C, fp32 A/D/delta_bias, z gate, D skip,
delta_bias + softplus, B/C per step (b, n, l) contiguous. Variants are FWD_CONFIG / BWD_CONFIG keys of
mambakit.ops._triton_selective_scan; the table's labels abbreviate them (see label()).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

SMOKE = "--smoke" in sys.argv  # CPU, Triton interpreter, tiny shapes: checks this script's own logic
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mambakit.ops import _triton_scan_time as TK  # noqa: E402
from mambakit.ops import _triton_scan_time_bwd as TB  # noqa: E402
from mambakit.ops import _triton_selective_scan as K  # noqa: E402
from mambakit.ops.dispatch import backend  # noqa: E402
from mambakit.ops.selective_scan import selective_scan_fn  # noqa: E402
from mambakit.ops.state_update import selective_state_update, selective_state_update_ref  # noqa: E402

# official mamba-ssm on one H100 (shared/ANCHORS.md): (fwd ms, fwd+bwd ms); goals of the task
ANCHOR = {(4, 3072, 4096): (0.883, 4.79), (1, 3072, 65536): (4.47, 21.2), (2, 1536, 2048): (0.129, 0.696)}
GOAL = {(4, 3072, 4096): (0.60, 3.5), (1, 3072, 65536): (3.0, None)}
N = 16
DEV = "cpu" if SMOKE else "cuda"
R = {"sections": {}}


def S(*shape):
    """The real shape, or a tiny one in --smoke mode."""
    if not SMOKE:
        return shape
    b, d, l = shape
    return min(b, 2), min(d, 16), min(l, 24)
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def section(name, budget):
    """Decorator: run fn() unless the budget is spent; record errors instead of raising."""
    def wrap(fn):
        if time.time() - T0 > budget:
            R["sections"][name] = "skipped (budget)"
            log(f"== {name}: skipped, budget of {budget:.0f}s spent")
            return fn
        log(f"== {name}")
        try:
            fn()
            R["sections"][name] = "ok"
        except Exception:  # keep going: one broken part must not hide the others
            R["sections"][name] = "error: " + traceback.format_exc(limit=6)
            log(f"{name} FAILED\n{traceback.format_exc()}")
        torch.cuda.empty_cache()
        return fn
    return wrap


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def inputs(b, d, l, dtype=torch.bfloat16, bc="step", g=1, channels_last=False, grad=False, options=True):
    dev = DEV
    x = {
        "u": torch.randn(b, d, l, device=dev, dtype=dtype),
        "delta": (torch.randn(b, d, l, device=dev) * 0.5 - 1.0).to(dtype),
        "A": -torch.exp(torch.randn(d, N, device=dev) * 0.5),
    }
    shape = {"const": (d, N), "step": (b, N, l), "group": (b, g, N, l)}[bc]
    x["B"] = torch.randn(*shape, device=dev, dtype=dtype if bc != "const" else torch.float32)
    x["C"] = torch.randn(*shape, device=dev, dtype=dtype if bc != "const" else torch.float32)
    if options:
        x.update(D=torch.randn(d, device=dev), z=torch.randn(b, d, l, device=dev, dtype=dtype),
                 delta_bias=torch.randn(d, device=dev) * 0.3)
    if channels_last:
        x = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if v.dim() == 3 and k != "B" and k != "C" else v)
             for k, v in x.items()}
    return {k: v.requires_grad_(grad) for k, v in x.items()}


def call(x, seq_idx=None, h0=None, last=False):
    kw = {k: v for k, v in x.items() if k in ("D", "z", "delta_bias")}
    return selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], **kw, delta_softplus="delta_bias" in x,
                             return_last_state=last, initial_state=h0, seq_idx=seq_idx)


def fwd_bwd(x, name, seq_idx=None, h0=None, dout=None, dlast=None):
    """out, last, grads of every input requiring grad, under backend `name` (dlast None: out's gradient only)."""
    with backend(name):
        out, last = call(x, seq_idx, h0, last=True)
        leaves = [v for v in list(x.values()) + [h0] if v is not None and v.requires_grad]
        outs, gouts = ([out, last], [dout, dlast]) if dlast is not None else ([out], [dout])
        grads = torch.autograd.grad(outs, leaves, gouts)
    names = [k for k, v in x.items() if v.requires_grad] + (["initial_state"] if h0 is not None else [])
    return out, last, dict(zip(names, grads))


def compare(tag, got, ref, tol):
    errs = {"out": rel(got[0], ref[0]), "last_state": rel(got[1], ref[1])}
    errs.update({"d" + k: rel(got[2][k], ref[2][k]) for k in ref[2]})
    worst = max(errs.values())
    R.setdefault("correctness", {})[tag] = {"errs": errs, "max": worst, "tol": tol, "pass": worst <= tol}
    log(f"{tag}: max rel err {worst:.2e} (tol {tol:.0e}) {'PASS' if worst <= tol else 'FAIL'}",
        {k: f"{v:.1e}" for k, v in errs.items()})


def upcast(x):
    return {k: v.detach().float().requires_grad_(v.requires_grad) for k, v in x.items()}


def check_bf16(b, d, l, tag, **kw):
    """bf16 kernel vs the fp32 PyTorch path on the same (upcast) values; the bf16 PyTorch path for scale.
    No initial state and no last-state gradient: the same kernel specialisations as the timings."""
    b, d, l = S(b, d, l)
    x = inputs(b, d, l, grad=True, **kw)
    dout = torch.randn(b, d, l, device=DEV, dtype=torch.bfloat16)
    ref = fwd_bwd(upcast(x), "torch", None, None, dout.float())
    got = fwd_bwd(x, "triton", None, None, dout)
    base = fwd_bwd(x, "torch", None, None, dout)
    compare(f"{tag} bf16 triton vs fp32 ref", got, ref, 1e-2)
    compare(f"{tag} bf16 torch path vs fp32 ref (scale)", base, ref, 1e-2)


def check_fp32(b, d, l, tag, seq=False, **kw):
    """fp32 kernel vs the fp32 PyTorch path, with an initial state and a last-state gradient."""
    b, d, l = S(b, d, l)
    x = upcast(inputs(b, d, l, grad=True, **kw))
    h0 = torch.randn(b, d, N, device=DEV, requires_grad=True)
    seq_idx = None
    if seq:  # row 0: three packed sequences
        seq_idx = torch.zeros(b, l, device=DEV, dtype=torch.int32)
        seq_idx[0, l // 3:] = 1
        seq_idx[0, l // 2 + 3:] = 2
    dout, dlast = torch.randn(b, d, l, device=DEV), torch.randn(b, d, N, device=DEV)
    compare(f"{tag} fp32 triton vs torch", fwd_bwd(x, "triton", seq_idx, h0, dout, dlast),
            fwd_bwd(x, "torch", seq_idx, h0, dout, dlast), 1e-4)


def bench(fn, grad_to_none=None, rep=60):
    if SMOKE:  # no CUDA events on the CPU: one timed call
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton
    return triton.testing.do_bench(fn, warmup=10, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def run_1m(d=5120, l=1 << 20):
    """1M tokens x 5120 channels forward (offsets past 2^31): the last 64 channels against a separate run of
    just those channels, a run carrying the state over 4 pieces, and the fp32 PyTorch path on a prefix."""
    torch.manual_seed(0)
    if SMOKE:
        d, l = 80, 64
    x = inputs(1, d, l)
    with backend("triton"), torch.no_grad():
        out, last = call(x, last=True)
        R["long_1m"] = {"fwd_ms": bench(lambda: call(x), rep=200)}
        hi = slice(d - 64, d)
        xs = {k: (v[:, hi].contiguous() if k in ("u", "delta", "z") else v[hi] if k in ("A", "D", "delta_bias")
                  else v) for k, v in x.items()}
        x.clear()  # frees 32 GB
        out_s, last_s = call(xs, last=True)
        rec = R["long_1m"]
        rec["slice_vs_full_out_maxabs"] = float((out[:, hi].float() - out_s.float()).abs().max())
        rec["slice_vs_full_last_rel"] = rel(last[:, hi], last_s)
        del out
        h, pieces = None, []
        for p in range(4):  # the same 64 channels in 4 pieces, carrying the state
            sl = slice(p * l // 4, (p + 1) * l // 4)
            xp = {k: (v[..., sl] if k in ("u", "delta", "z", "B", "C") else v) for k, v in xs.items()}
            o, h = call(xp, h0=h, last=True)
            pieces.append(o)
        rec["pieces_vs_one_out_rel"] = rel(torch.cat(pieces, -1), out_s)
        rec["pieces_vs_one_last_rel"] = rel(h, last_s)
    pre = {k: (v[..., :min(l, 8192)] if k in ("u", "delta", "z", "B", "C") else v) for k, v in xs.items()}
    with backend("torch"), torch.no_grad():
        ref_o, _ = call(upcast(pre), last=True)
    rec["prefix8192_vs_fp32_torch_rel"] = rel(out_s[..., :min(l, 8192)], ref_o)
    ok = (rec["slice_vs_full_last_rel"] < 1e-6 and rec["pieces_vs_one_last_rel"] < 1e-5
          and rec["prefix8192_vs_fp32_torch_rel"] < 1e-2 and rec["slice_vs_full_out_maxabs"] < 1e-2)
    rec["pass"] = ok
    log("1M x 5120:", rec)


def check_state_update():
    dev = DEV
    res = R.setdefault("state_update", {})
    forms = (("mamba1 b64 d5120 n16", (64, 1, 5120, 16)), ("mamba2 b64 h80 p64 n128", (64, 80, 64, 128)))
    if SMOKE:
        forms = (("mamba1 tiny", (2, 1, 16, 4)), ("mamba2 tiny", (2, 4, 8, 8)))
    for form, (b, h, p, n) in forms:
        m1 = h == 1
        state = torch.randn(b, p, n, device=dev) if m1 else torch.randn(b, h, p, n, device=dev)
        x = torch.randn(b, p, device=dev) if m1 else torch.randn(b, h, p, device=dev)
        if m1:
            args = dict(dt=torch.randn(b, p, device=dev), A=-torch.rand(p, n, device=dev), B=torch.randn(b, n, device=dev),
                        C=torch.randn(b, n, device=dev), D=torch.randn(p, device=dev), z=torch.randn(b, p, device=dev),
                        dt_bias=torch.randn(p, device=dev))
        else:  # the official Mamba-2 call: per-head values expanded with stride 0
            args = dict(dt=torch.randn(b, h, 1, device=dev).expand(b, h, p),
                        A=-torch.rand(h, 1, 1, device=dev).expand(h, p, n), B=torch.randn(b, 1, n, device=dev),
                        C=torch.randn(b, 1, n, device=dev), D=torch.randn(h, 1, device=dev).expand(h, p),
                        z=torch.randn(b, h, p, device=dev), dt_bias=torch.randn(h, 1, device=dev).expand(h, p))
        s_ref, s_got = state.clone(), state.clone()
        ref = selective_state_update_ref(s_ref, x, **args, dt_softplus=True)
        with backend("triton"):
            got = selective_state_update(s_got, x, **args, dt_softplus=True)
            res[form] = {"out_rel": rel(got, ref), "state_rel": rel(s_got, s_ref)}
            ms = bench(lambda: selective_state_update(s_got, x, **args, dt_softplus=True))
        with backend("torch"):
            ms_t = bench(lambda: selective_state_update(s_got, x, **args, dt_softplus=True))
        res[form].update(triton_us=ms * 1e3, torch_us=ms_t * 1e3, state_GBps=2 * state.numel() * 4 / ms / 1e6)
        log(form, res[form])


def label(fwd=None, bwd=None):
    """A compact config name: pf = prefetch (pf2: two chunks ahead), c = chunk, k = nk, bd = block_d, P = parts (0 auto), cl = cl_copy,
    st = num_stages, w = num_warps, r = maxnreg; 'f:' forward keys, 'b:' backward keys."""
    short = dict(prefetch="pf", chunk="c", nk="k", block_d="bd", parts="P", cl_copy="cl", num_stages="st",
                 num_warps="w", part_programs="pp", seg="sg", maxnreg="r")

    def one(c):
        c = dict(c)
        tc = c.pop("tc", None) or c.pop("tb", None)  # FWD_TIME_CONFIG / BWD_TIME_CONFIG keys, e.g. "t:c1024 w2"
        kernel = c.pop("kernel", None)  # forced forward kernel: "ch" channel-parallel, "T!" time-parallel
        head = {"channel": "ch ", "time": "T! "}.get(kernel, "") + (f"t:{one(tc)} " if tc else "")
        return head + " ".join(short.get(k, k) + ("" if v is True else str(v)) for k, v in c.items() if v is not False)
    parts = ([f"f:{one(fwd)}"] if fwd else []) + ([f"b:{one(bwd)}"] if bwd else [])
    return " ".join(parts) or "default"


class variant:
    """Context manager: FWD_CONFIG / BWD_CONFIG updated with the given keys, restored on exit."""

    def __init__(self, fwd=None, bwd=None):
        self.fwd, self.bwd = fwd or {}, bwd or {}

    def __enter__(self):
        self.saved = dict(K.FWD_CONFIG), dict(K.BWD_CONFIG), dict(TK.FWD_TIME_CONFIG), dict(TB.BWD_TIME_CONFIG)
        fwd, bwd = dict(self.fwd), dict(self.bwd)
        TK.FWD_TIME_CONFIG.update(fwd.pop("tc", {}))
        TB.BWD_TIME_CONFIG.update(bwd.pop("tb", {}))
        K.FWD_CONFIG.update(fwd)
        K.BWD_CONFIG.update(bwd)

    def __exit__(self, *exc):
        for cfg, saved in zip((K.FWD_CONFIG, K.BWD_CONFIG, TK.FWD_TIME_CONFIG, TB.BWD_TIME_CONFIG), self.saved):
            cfg.clear()
            cfg.update(saved)


def timed(shape, fwd=None, bwd=None, cl=False, fb=False, bc="step"):
    """Time one variant: the forward (no grad), and with fb also forward+backward. Recorded under
    R['variants'][shape key][label]; channels-last shapes get ' cl' in the key."""
    b, d, l = S(*shape)
    key = f"b{b} d{d} l{l}" + (" cl" if cl else "") + ("" if bc == "step" else f" {bc}")
    name = label(fwd, bwd)
    rec = R.setdefault("variants", {}).setdefault(key, {}).setdefault(name, {})
    with variant(fwd, bwd), backend("triton"):
        if not fb or "fwd_ms" not in rec:
            x = inputs(b, d, l, channels_last=cl, bc=bc)
            with torch.no_grad():
                rec["fwd_ms"] = bench(lambda: call(x))
            del x
        if fb:
            xg = inputs(b, d, l, channels_last=cl, grad=True, bc=bc)
            dout = torch.randn(b, l, d, device=DEV, dtype=torch.bfloat16).transpose(1, 2)  # out_proj's gradient
            if not cl:
                dout = dout.contiguous()
            rec["fwd_bwd_ms"] = bench(lambda: call(xg).backward(dout), grad_to_none=list(xg.values()))
    log(f"{key:22s} {name:44s}", {k: round(v, 3) for k, v in rec.items()})


def check_variant(fwd, bwd, cl=True, busy_only=False):
    """bf16 (full size; channels-last with cl) and fp32 grouped + seq_idx + initial state + last-state gradient
    under a variant, against the PyTorch path; the same on grids of at least 64 channels an SM, which take the
    busy-grid plan (4 channels a warp, quad, 64-step chunks). busy_only: those two only."""
    with variant(fwd, bwd):
        name = label(fwd, bwd)
        if not busy_only:
            check_bf16(2, 1536, 2048, f"b2 d1536 l2048{' cl' if cl else ''} [{name}]", channels_last=cl)
            check_fp32(2, 512, 1000, f"b2 d512 l1000 g4 seq [{name}]", seq=True, bc="group", g=4)
        check_fp32(8, 1536, 1000, f"b8 d1536 l1000 g4 seq busy [{name}]", seq=True, bc="group", g=4)
        check_bf16(4, 3072, 1024, f"b4 d3072 l1024 busy [{name}]")


def table():
    lines = ["", "=" * 100, f"Mamba-1 selective scan on {R.get('device')}  (ms, do_bench median; official = "
             "mamba-ssm CUDA on H100; labels: pf prefetch, c chunk, k nk, bd block_d, P parts (0 auto), cl cl_copy, "
             "st num_stages)"]
    lines.append(f"{'shape':18s} {'config':50s} {'fwd':>7s} {'fwd+bwd':>8s} {'off f':>6s} {'off fb':>6s} "
                 f"{'goal f':>6s} {'goal fb':>7s}")
    f = lambda v, w=7: f"{v:{w}.3f}" if isinstance(v, float) else f"{'-':>{w}s}"  # noqa: E731
    for shape, recs in R.get("variants", {}).items():
        key = tuple(int(s[1:]) for s in shape.split()[:3])
        off, goal = ANCHOR.get(key, (None, None)), GOAL.get(key, (None, None))
        for cfg, r in recs.items():
            lines.append(f"{shape:18s} {cfg[:50]:50s} {f(r.get('fwd_ms'))} {f(r.get('fwd_bwd_ms'), 8)} "
                         f"{f(off[0], 6)} {f(off[1], 6)} {f(goal[0], 6)} {f(goal[1], 7)}")
    for shape, recs in R.get("variants", {}).items():  # the fastest config per shape: candidates for defaults
        for metric in ("fwd_ms", "fwd_bwd_ms"):
            cand = {c: r[metric] for c, r in recs.items() if metric in r}
            if cand:
                best = min(cand, key=cand.get)
                lines.append(f"best {metric:10s} {shape:18s} {cand[best]:8.3f} ms  {best}")
                R.setdefault("best", {}).setdefault(shape, {})[metric] = [best, cand[best]]
    if "long_1m" in R:
        lines.append(f"1M tokens x 5120 fwd: {R['long_1m'].get('fwd_ms', float('nan')):.2f} ms, "
                     f"checks pass={R['long_1m'].get('pass')}")
    for tag, c in R.get("correctness", {}).items():
        lines.append(f"correctness {tag[:70]:70s} max rel err {c['max']:.2e}  {'PASS' if c['pass'] else 'FAIL'}")
    for form, s in R.get("state_update", {}).items():
        lines.append(f"state update {form:26s} triton {s['triton_us']:7.1f} us ({s['state_GBps']:.0f} GB/s)  torch "
                     f"{s['torch_us']:7.1f} us  rel err out {s['out_rel']:.1e} state {s['state_rel']:.1e}")
    for name, st in R["sections"].items():
        if st != "ok":
            lines.append(f"section {name}: {st.splitlines()[0] if st else st}")
    print("\n".join(lines), flush=True)


B4, B1 = (4, 3072, 4096), (1, 3072, 65536)
W = dict(block_d=32, nk=4)  # the wide tiles
# ptxas -v for sm_90a (Triton 3.9, bf16, the timed options, no seq_idx): fwd wide chunk 4: 154 registers (3
# programs of 4 warps per SM), with prefetch 194 / 206 (2 programs per SM: 384 programs at b4 need 1.45 waves;
# maxnreg=168 keeps 3 with no / 38 bytes of spills), chunk 8: ~210-220, chunk 16: 255 + spills. bwd wide
# chunk 4: 237 registers (2 programs per SM: 1.45 waves at b4, hence the backward time splits and maxnreg=168,
# 88 bytes of spills), chunk 8 and (64, 8, 4) spill kilobytes. Forward variants at b4 d3072 l4096 (contiguous and channels-last): software prefetch,
# larger chunks, 8 states a thread, Triton's pipelining stages, a time split for more warps in flight, and for
# channels-last the contiguous copy.
CH = dict(kernel="channel")  # the channel-parallel forward (the default before the time-parallel kernel)


def T(chunk, warps, block_d=1, **kw):
    """A time-parallel forward variant (FWD_TIME_CONFIG keys)."""
    return dict(tc=dict(chunk=chunk, num_warps=warps, block_d=block_d, **kw))


# Forward at b4 d3072 l4096, contiguous: the old default, the new one (time-parallel), and its tiles: chunk
# (steps per program iteration), warps (chunk / (32 warps) steps a thread), channels per program.
def KT(steps, rows, **kw):
    """The (T, K) time-parallel forward: K = steps contiguous steps a row, T = rows rows (32 a warp)."""
    return dict(tc=dict(steps=steps, rows=rows, **kw))


# maxnreg 96 / 80: 21 / 25 warps an SM instead of 16 (at b1 d3072, 3072 one-warp programs: 1.45 waves of
# 2112 at 128 registers, one wave at 80), if ptxas does not spill
# (measured gpu_run9/call1: b4 r96 0.800 vs 0.704; b1 r80 3.432, r72 3.492, r96 4.766 vs 3.547; call2, 2
# channels a program sharing B/C (kernel since removed): b4 1.25-1.44, b1 5.3-6.5)
# even / pairs: no masks on whole chunks, bf16 B/C read as int32 pairs (offline SASS: 2992 -> 2912 -> 2776
# instructions a chunk)
# (gpu_run10/call1: b4 default 0.704, even 0.736, even + pairs 0.693; b1 3.358, 3.708, 3.422; fwd+bwd b4 default
# 4.655, lean forward 4.611, shift_da 4.768, shift_da + pairs with the lean forward 4.906: kept off)
# agg: row aggregates first (decay from dt's row sum), then one exact pass a row (offline SASS 2992 -> 2888,
# 2688 with even + pairs)
# (call3: b4 0.715 / 0.704 agg / 0.693 agg + even + pairs, b1 3.566 / 3.473 / 3.462: the last now the default)
# bc_f32: 16-bit B/C widened to fp32 once before the launch (offline SASS 2688 -> 2488, a 56-byte stack)
# (gpu_run11/call1: b4 0.795 vs 0.696, b1 3.956 vs 3.445: off; backward maxnreg 192 5.68 vs 4.681, 224 5.198
# vs 4.683 (gpu_time_scan_bwd.py); call2: backward block_d 8 / 16 / 32 7.16 / 7.75 / 8.55 vs 4.637)
# ahead: the next chunk's u / delta and this chunk's z loaded 4 states before the end of the state loop
# (call3, gpu_time_scan_fwd.py, bit-identical outputs: b4 0.695 -> 0.662, b1 3.443 -> 3.289: the default)
# backward quad (4 channels' dB/dC by a reduce-scatter; call4: fwd+bwd b4 4.638 -> 4.468: the default);
# gpu_run12 (gpu_time_scan_bwd.py): the backward's ahead 4 4.534 -> 4.202 (the default; b1 19.86 -> 19.06),
# quad bfly 4.616, quad False 4.889 vs 4.161: off; prefetch 2 4.296 vs 4.158, a_evict 4.225 / a_lanes 5.051 vs 4.161: removed
LEAN_A = KT(8, 32, agg=True, even=True, pairs=True)
FWD_B4 = [{}, KT(8, 32, ahead2=True)]
# channels-last (transposed views; the Mamba module's layout before the fourth session): the channel-parallel kernel, or a contiguous copy then the time one
FWD_B4_CL = []
FWD_B1 = [{}, KT(8, 32, ahead2=True)]


def TBW(**kw):
    """A time-parallel backward variant (BWD_TIME_CONFIG keys)."""
    return dict(tb=kw)


# fwd+bwd: (shape, channels-last, forward keys, backward keys): the old default (channel-parallel both ways),
# the new one (time-parallel both ways, on contiguous inputs), the time forward with the channel backward, and
# the time backward's tiles (block_d channels a program, chunk T (a multiple of the forward's 512), warps)
# Next to measure: 2 or 4 channels in one warp (rows of 16 or 8: the forward saves a state every 128 or 64
# steps), dB/dC summed over them across lanes before the atomics. ptxas: 2 channels (_atomic_pair) 7,790
# instructions a chunk against 7,200 for one channel, half the atomic bytes and instructions; 4 channels
# 8,110, a quarter of the bytes but 4-byte reductions.
# Measured (notes/gpu_run8/call1, H200): default 4.939, bd2 + seg 128 4.767, bd4 + seg 64 4.652, seg 128 with
# one channel 8.55 (chunks of 128 steps). Next: 8 channels (seg 32) and the b1 shape.
# Then (call2): bd4 + seg 64 4.658 again (passes the full-size checks), bd8 + seg 32 6.55; (call3) b1: default
# 19.87, bd4 + seg 64 24.0, hence the busy-grid rule (_triton_scan_time.busy_grid), now the default: the
# defaults at both shapes (b4 takes bd4 + seg 64, b1 the former plan).
# shift_da: the backward's dA_{t+1} from dA shifted one step; pairs: its B/C read as int32 pairs (offline SASS
# 8024 -> 7544 -> 7136 instructions, MUFU 338 -> 219)
LEAN_F, LEAN_B = KT(8, 32, even=True, pairs=True), TBW(shift_da=True, pairs=True)
FB = [(B4, False, {}, {})]  # the backward candidates: gpu_time_scan_bwd.py (gpu_session.sh part bwd-time)
# correctness of the new paths at full size (every path the timings use: prefetch, split fwd/bwd, cl_copy)
# (forward keys, backward keys, bf16 check on channels-last inputs); "time" forced: contiguous inputs only
CHECKS = [(dict(KT(8, 32, ahead2=True), kernel="time"), dict(TBW(a_ahead=2), kernel="time"), False),
          (dict(KT(8, 32, ahead=8), kernel="time"), dict(TBW(quad="bfly", ahead=4), kernel="time"), False),
          (dict(KT(8, 32, ahead=8), kernel="time"), dict(kernel="time"), False),
          (dict(KT(8, 32, bc_f32=True), kernel="time"), dict(TBW(maxnreg=168), kernel="time"), False),
          (dict(LEAN_A, kernel="time"), dict(kernel="time"), False),
          (dict(LEAN_F, kernel="time"), dict(LEAN_B, kernel="time"), False),
          (dict(KT(8, 32, seg=64), kernel="time"), dict(TBW(block_d=4), kernel="time"), False),
          (dict(KT(8, 32, seg=32), kernel="time"), dict(TBW(block_d=8), kernel="time"), False),
          (dict(KT(8, 32, seg=128), kernel="time"), dict(TBW(block_d=2), kernel="time"), False),
          (dict(KT(8, 32), kernel="time"), dict(TBW(block_d=2), kernel="time"), False),
          (dict(KT(8, 32, maxnreg=128), kernel="time"), dict(TBW(chunk=512, maxnreg=128), kernel="time"), False),
          (dict(KT(8, 64, maxnreg=96), kernel="time"), dict(TBW(chunk=512, maxnreg=96), kernel="time"), False),
          (dict(KT(16, 128), kernel="time"), dict(TBW(chunk=2048), kernel="time"), False),
          (dict(KT(4, 32, prefetch=False), kernel="time"), dict(kernel="channel", parts=3), False)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for gpu_check_mamba1.json")
    ap.add_argument("--budget", type=float, default=165.0,
                    help="seconds after which the remaining sections are skipped (e.g. 400 for a full tuning run)")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter + tiny shapes (tests this script)")
    ap.add_argument("--skip-default-check", action="store_true", help="do not re-check the defaults first")
    ap.add_argument("--skip-checks", action="store_true", help="timings only (no correctness sections)")
    ap.add_argument("--first-check-only", action="store_true",
                    help="of the correctness sections, only the first variant's (CHECKS[0]) before the timings")
    ap.add_argument("--defaults-only", action="store_true",
                    help="of the correctness sections, only the defaults' before the timings")
    ap.add_argument("--busy-only", action="store_true",
                    help="only the defaults' checks on busy grids (no timings)")
    args = ap.parse_args(argv)
    import triton
    R.update(device="cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
             fwd_config=dict(K.FWD_CONFIG), bwd_config=dict(K.BWD_CONFIG))
    torch.manual_seed(0)
    bud = args.budget
    checks = CHECKS
    if SMOKE:  # 8-step checkpoints, so that the tiny shapes still split in time
        K.FWD_CONFIG["seg"] = 8
        TK.FWD_TIME_CONFIG["chunk"] = 16
    first_only = args.first_check_only or args.defaults_only or args.busy_only  # no checks after the timings
    if args.skip_checks or first_only:
        checks = checks[:1] if first_only else [(None, None, None)]
    if args.busy_only:
        section("check defaults on busy grids", bud)(lambda: check_variant({}, {}, busy_only=True))
        FWD_B4.clear(), FWD_B1.clear(), FB.clear()
    elif not (args.skip_default_check or args.skip_checks):
        section("check defaults: bf16 cl + fp32 group/seq_idx/h0", bud)(lambda: check_variant({}, {}))
    if not (args.skip_checks or args.defaults_only or args.busy_only):
        section(f"check {label(*checks[0][:2])}", bud)(lambda: check_variant(*checks[0]))
    if first_only:
        args.skip_checks = True
    for v in FWD_B4:
        section(f"fwd b4 {label(v)}", bud)(lambda v=v: timed(B4, fwd=v))
    for v in FWD_B4_CL:
        section(f"fwd b4 cl {label(v)}", bud)(lambda v=v: timed(B4, fwd=v, cl=True))
    for v in FWD_B1:
        section(f"fwd b1 {label(v)}", bud)(lambda v=v: timed(B1, fwd=v))
    for shape, cl, fv, bv in FB[:7]:
        section(f"fwd+bwd {shape} cl={cl} {label(fv, bv)}", bud)(
            lambda shape=shape, cl=cl, fv=fv, bv=bv: timed(shape, fwd=fv, bwd=bv, cl=cl is True, fb=True,
                                                           bc=cl if isinstance(cl, str) else "step"))
    for shape, cl, fv, bv in FB[7:]:
        section(f"fwd+bwd {shape} cl={cl} {label(fv, bv)}", bud)(
            lambda shape=shape, cl=cl, fv=fv, bv=bv: timed(shape, fwd=fv, bwd=bv, cl=cl is True, fb=True,
                                                           bc=cl if isinstance(cl, str) else "step"))
    for fv, bv, cl in checks[1:]:
        section(f"check {label(fv, bv)}", bud)(lambda fv=fv, bv=bv, cl=cl: check_variant(fv, bv, cl))
    if not args.skip_checks:
        section("fp32 constant B/C, time split", bud)(lambda: check_variant_const())
        section("1M tokens x 5120", bud)(run_1m)
        section("state update", bud)(check_state_update)
    table()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check_mamba1.json").write_text(json.dumps(R, indent=1, default=str))
    log(f"wrote {out / 'gpu_check_mamba1.json'}")


def check_variant_const():
    with variant(dict(parts=3, prefetch=True), dict(parts=3)):
        check_fp32(2, 256, 777, "b2 d256 l777 const [f:P3 pf b:P3]", bc="const")


if __name__ == "__main__":
    main()
