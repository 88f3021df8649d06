"""GPU check of the Mamba-1 selective scan and state update: correctness at full size, then timings.

    python scripts/gpu_check_mamba1.py --out OUT_DIR

Sections run in order of importance under a wall-clock budget (--budget seconds); a failing or skipped
section never stops the others. Prints a table last and writes OUT_DIR/gpu_check_mamba1.json.
Timings: triton.testing.do_bench medians; bf16 u/delta/z/B/C, fp32 A/D/delta_bias, z gate, D skip,
delta_bias + softplus, B/C per step (b, n, l), inputs contiguous (b, d, l) unless noted.
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


def min_bytes(b, d, l):
    return 4 * b * d * l * 2 + 2 * b * N * l * 2  # u, delta, z, out + B, C (bf16)


def time_shape(b, d, l, name="triton", key="default", fwd_only=False, **cfg):
    b, d, l = S(b, d, l)
    x = inputs(b, d, l)
    with backend(name):
        if cfg:
            K.FWD_CONFIG.update(cfg.get("fwd", {}))
            K.BWD_CONFIG.update(cfg.get("bwd", {}))
        with torch.no_grad():
            ms_f = bench(lambda: call(x))
        rec = {"fwd_ms": ms_f, "fwd_GBps": min_bytes(b, d, l) / ms_f / 1e6}
        if not fwd_only:
            xg = inputs(b, d, l, grad=True)
            dout = torch.randn(b, d, l, device=DEV, dtype=torch.bfloat16)
            leaves = list(xg.values())
            rec["fwd_train_ms"] = bench(lambda: call(xg), grad_to_none=leaves)
            rec["fwd_bwd_ms"] = bench(lambda: call(xg).backward(dout), grad_to_none=leaves)
    R.setdefault("timing", {}).setdefault(f"b{b} d{d} l{l}", {})[f"{name}:{key}"] = rec
    log(f"{name}:{key} b{b} d{d} l{l}:", {k: round(v, 4) for k, v in rec.items()})
    return rec


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


def table():
    lines = ["", "=" * 100, f"Mamba-1 selective scan on {R.get('device')}  (ms, do_bench median; official = mamba-ssm CUDA)"]
    lines.append(f"{'shape':22s} {'config':34s} {'fwd':>8s} {'GB/s':>6s} {'fwd(train)':>10s} {'fwd+bwd':>8s}"
                 f" {'off fwd':>8s} {'off f+b':>8s} {'goal f':>7s} {'goal fb':>7s}")
    for shape, recs in R.get("timing", {}).items():
        key = tuple(int(s[1:]) for s in shape.split())
        off, goal = ANCHOR.get(key, (None, None)), GOAL.get(key, (None, None))
        for cfg, r in recs.items():
            f = lambda v: f"{v:8.3f}" if isinstance(v, float) else f"{'-':>8s}"  # noqa: E731
            lines.append(f"{shape:22s} {cfg:34s} {f(r.get('fwd_ms'))} {r.get('fwd_GBps', 0):6.0f} "
                         f"{f(r.get('fwd_train_ms')):>10s} {f(r.get('fwd_bwd_ms'))} {f(off[0])} {f(off[1])} "
                         f"{f(goal[0])[1:]} {f(goal[1])[1:]}")
    for shape, recs in R.get("timing", {}).items():  # the fastest Triton config per shape: set it as default
        tri = {c: r for c, r in recs.items() if c.startswith("triton")}
        for metric in ("fwd_ms", "fwd_bwd_ms"):
            cand = {c: r[metric] for c, r in tri.items() if metric in r}
            if cand:
                best = min(cand, key=cand.get)
                lines.append(f"best {metric:10s} {shape:18s} {cand[best]:8.3f} ms  {best}")
                R.setdefault("best", {}).setdefault(shape, {})[metric] = [best, cand[best]]
    if "long_1m" in R:
        lines.append(f"1M tokens x 5120 fwd: {R['long_1m'].get('fwd_ms', float('nan')):.2f} ms, "
                     f"checks pass={R['long_1m'].get('pass')}")
    for tag, c in R.get("correctness", {}).items():
        lines.append(f"correctness {tag:52s} max rel err {c['max']:.2e}  {'PASS' if c['pass'] else 'FAIL'}")
    for form, s in R.get("state_update", {}).items():
        lines.append(f"state update {form:26s} triton {s['triton_us']:7.1f} us ({s['state_GBps']:.0f} GB/s)  torch "
                     f"{s['torch_us']:7.1f} us  rel err out {s['out_rel']:.1e} state {s['state_rel']:.1e}")
    for name, st in R["sections"].items():
        if st != "ok":
            lines.append(f"section {name}: {st.splitlines()[0] if st else st}")
    print("\n".join(lines), flush=True)


# nk = states per thread (y's reduction over n: 4 / 1.5 / 0.5 shuffles per element for nk 1 / 2 / 4; threads
# b * d * n / nk); num_warps None = block_d * (n / nk) / 32 (every thread one (channel, j) pair).
FWD_VARIANTS = [dict(nk=1, block_d=8, chunk=16), dict(nk=2, block_d=16, chunk=8), dict(nk=2, block_d=8, chunk=8),
                dict(nk=4, block_d=32, chunk=4), dict(nk=4, block_d=8, chunk=8), dict(nk=1, block_d=4, chunk=16),
                dict(nk=1, block_d=8, chunk=8), dict(nk=2, block_d=16, chunk=16)]
BWD_VARIANTS = [dict(nk=1, block_d=8, chunk=16), dict(nk=2, block_d=16, chunk=8), dict(nk=1, block_d=8, chunk=8),
                dict(nk=4, block_d=32, chunk=4), dict(nk=2, block_d=8, chunk=8)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for gpu_check_mamba1.json")
    ap.add_argument("--budget", type=float, default=80.0,
                    help="seconds after which the remaining sections are skipped (e.g. 400 for a full tuning run)")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter + tiny shapes (tests this script)")
    args = ap.parse_args(argv)
    import triton
    R.update(device="cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
             fwd_config=dict(K.FWD_CONFIG), bwd_config=dict(K.BWD_CONFIG))
    torch.manual_seed(0)
    bud = args.budget
    defaults = (dict(K.FWD_CONFIG), dict(K.BWD_CONFIG))

    def reset():
        K.FWD_CONFIG.clear(), K.FWD_CONFIG.update(defaults[0])
        K.BWD_CONFIG.clear(), K.BWD_CONFIG.update(defaults[1])

    section("bf16 correctness b2 d1536 l2048", bud)(lambda: check_bf16(2, 1536, 2048, "b2 d1536 l2048 step"))
    for shape in ((4, 3072, 4096), (1, 3072, 65536), (2, 1536, 2048)):
        section(f"timing {shape}", bud)(lambda shape=shape: time_shape(*shape))
    section("1M tokens x 5120", bud)(run_1m)
    section("fp32 correctness all options", bud)(lambda: check_fp32(2, 1536, 2048, "b2 d1536 l2048 step"))
    section("fp32 grouped + seq_idx", bud)(lambda: check_fp32(2, 512, 1000, "b2 d512 l1000 g4 seq_idx", seq=True,
                                                               bc="group", g=4))
    section("state update", bud)(check_state_update)
    for v in FWD_VARIANTS[1:]:
        def fv(v=v):
            for shape in ((4, 3072, 4096), (1, 3072, 65536)):
                time_shape(*shape, key=f"fwd {v}", fwd_only=True, fwd=v)
            reset()
        section(f"fwd variant {v}", bud)(fv)
    for v in BWD_VARIANTS[1:]:
        def bv(v=v):
            time_shape(4, 3072, 4096, key=f"bwd {v}", bwd=v)
            reset()
        section(f"bwd variant {v}", bud)(bv)
    section("fp32 constant B/C", bud)(lambda: check_fp32(2, 256, 777, "b2 d256 l777 const", bc="const"))
    section("bf16 channels-last", bud)(lambda: check_bf16(2, 1536, 2048, "b2 d1536 l2048 channels-last",
                                                          channels_last=True))
    section("timing channels-last", bud)(lambda: R.setdefault("timing_channels_last", time_shape_cl()))
    section("torch path timing", bud)(lambda: time_shape(2, 1536, 2048, name="torch"))
    table()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check_mamba1.json").write_text(json.dumps(R, indent=1, default=str))
    log(f"wrote {out / 'gpu_check_mamba1.json'}")


def time_shape_cl():
    """Fwd and fwd+bwd with channels-last u/delta/z (the Mamba module's views of in_proj's output)."""
    b, d, l = S(4, 3072, 4096)
    x = inputs(b, d, l, channels_last=True)
    with backend("triton"), torch.no_grad():
        ms_f = bench(lambda: call(x))
    xg = inputs(b, d, l, channels_last=True, grad=True)
    dout = torch.randn(b, d, l, device=DEV, dtype=torch.bfloat16)
    with backend("triton"):
        ms_fb = bench(lambda: call(xg).backward(dout), grad_to_none=list(xg.values()))
    rec = {"fwd_ms": ms_f, "fwd_bwd_ms": ms_fb}
    log("channels-last b4 d3072 l4096:", rec)
    return rec


if __name__ == "__main__":
    main()
