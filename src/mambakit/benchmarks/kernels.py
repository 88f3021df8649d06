"""`mambakit bench kernels`: each op at the official benchmark shapes of ANCHORS.md (issues 4/5).

Per op, shape and pass: median ms (``triton.testing.do_bench`` on CUDA), GB/s of the minimum bytes and that
as a fraction of the device's copy bandwidth (measured in the same run), and on an H100 the official figure.
Minimum bytes: forward = every input read once + the output written once; forward+backward = that plus the
output gradient read once and every input gradient written once. Inputs are bf16, A/D/dt bias fp32.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import report
from .common import Record, copy_bandwidth_gbs, free_memory, is_h100, kernel_ms, log, parse_list, pick_device

BF16, F32 = torch.bfloat16, torch.float32

# ANCHORS.md, official mamba-ssm 2.3.2.post1 / causal-conv1d 1.6.1 on an H100 80GB HBM3: (fwd ms, fwd+bwd ms).
OFFICIAL = {
    ("selective_scan", "b4 d3072 l4096 n16"): (0.883, 4.79),
    ("selective_scan", "b1 d3072 l65536 n16"): (4.47, 21.2),
    ("selective_scan", "b2 d1536 l2048 n16"): (0.129, 0.696),
    ("ssd", "b4 l4096 h48 p64 n128 g1"): (0.821, 3.87),
    ("ssd", "b1 l65536 h48 p64 n128 g1"): (2.22, 9.34),
    ("ssd", "b8 l2048 h80 p64 n128 g1"): (0.822, 5.13),
    ("causal_conv1d", "b4 d3072 l4096 w4"): (0.0754, None),
    ("causal_conv1d", "b1 d3328 l65536 w4"): (0.322, None),
    ("torch_conv1d_silu", "b4 d3072 l4096 w4"): (0.653, None),
}
ANCHOR_COPY_GBS = 3019.0

# (op, dims): full shapes are ANCHORS.md's; small ones run in well under a second on a CPU.
FULL = [
    ("selective_scan", (4, 3072, 4096, 16)), ("selective_scan", (1, 3072, 65536, 16)),
    ("selective_scan", (2, 1536, 2048, 16)),
    ("ssd", (4, 4096, 48, 64, 128, 1)), ("ssd", (1, 65536, 48, 64, 128, 1)), ("ssd", (8, 2048, 80, 64, 128, 1)),
    ("causal_conv1d", (4, 3072, 4096, 4)), ("causal_conv1d", (1, 3328, 65536, 4)),
    ("torch_conv1d_silu", (4, 3072, 4096, 4)),
]
QUICK = [FULL[0], FULL[3], FULL[6], FULL[8]]
SMALL = [("selective_scan", (2, 64, 256, 16)), ("ssd", (2, 256, 4, 16, 16, 1)),
         ("causal_conv1d", (2, 64, 512, 4)), ("torch_conv1d_silu", (2, 64, 512, 4))]
SSD_CHUNK, SSD_CHUNK_SMALL = 256, 64
BACKWARD_OPS = {"selective_scan", "ssd"}  # the ops whose fwd+bwd ANCHORS.md reports


@dataclass
class Case:
    """One op at one shape: a forward closure, the leaves to differentiate, and its minimum bytes."""

    op: str
    shape: str
    forward: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    fwd_bytes: int
    out_bytes: int

    @property
    def fwd_bwd_bytes(self) -> int:
        # + the output gradient read once + every input gradient written once
        return self.fwd_bytes + self.out_bytes + sum(t.numel() * t.element_size() for t in self.leaves)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _leaf(shape, dtype, device, scale=1.0, shift=0.0, grad=True) -> torch.Tensor:
    t = (torch.randn(shape, device=device, dtype=F32) * scale + shift).to(dtype)
    return t.requires_grad_(grad)


def scan_case(b, d, l, n, device) -> Case:
    from ..ops import selective_scan_fn

    u, delta, z = (_leaf((b, d, l), BF16, device) for _ in range(3))
    B, C = (_leaf((b, n, l), BF16, device) for _ in range(2))
    # S4D-real A = -(1..n) and dt bias giving softplus(dt) ~ 0.02, as in a trained/initialised layer.
    A = (-torch.arange(1, n + 1, device=device, dtype=F32).repeat(d, 1)).requires_grad_()
    D = _leaf((d,), F32, device)
    delta_bias = _leaf((d,), F32, device, 0.1, -4.0)
    fwd = lambda: selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)  # noqa: E731
    leaves = [u, delta, A, B, C, D, z, delta_bias]
    out_bytes = b * d * l * 2
    return Case("selective_scan", f"b{b} d{d} l{l} n{n}", fwd, leaves, _nbytes(*leaves) + out_bytes, out_bytes)


def ssd_case(b, l, h, p, n, g, device, chunk) -> Case:
    from ..ops import mamba_chunk_scan_combined

    x = _leaf((b, l, h, p), BF16, device)
    dt = _leaf((b, l, h), BF16, device, 0.5)
    B, C = (_leaf((b, l, g, n), BF16, device) for _ in range(2))
    A = (-torch.empty(h, device=device).uniform_(1, 16)).requires_grad_()  # official A_init_range (1, 16)
    D = _leaf((h,), F32, device)
    dt_bias = _leaf((h,), F32, device, 0.5, -4.0)
    fwd = lambda: mamba_chunk_scan_combined(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True)  # noqa: E731
    leaves = [x, dt, A, B, C, D, dt_bias]
    out_bytes = x.numel() * 2
    return Case("ssd", f"b{b} l{l} h{h} p{p} n{n} g{g}", fwd, leaves, _nbytes(*leaves) + out_bytes, out_bytes)


def conv_case(b, d, l, w, device, torch_baseline=False) -> Case:
    from ..ops import causal_conv1d_fn

    x = _leaf((b, d, l), BF16, device)
    weight = _leaf((d, w), BF16, device, w ** -0.5)
    bias = _leaf((d,), BF16, device, 0.1)
    if torch_baseline:  # what a model without a conv kernel runs (nn.Conv1d with padding, cut, SiLU)
        fwd = lambda: F.silu(F.conv1d(x, weight.unsqueeze(1), bias, padding=w - 1, groups=d)[..., :l])  # noqa: E731
    else:
        fwd = lambda: causal_conv1d_fn(x, weight, bias, activation="silu")  # noqa: E731
    op = "torch_conv1d_silu" if torch_baseline else "causal_conv1d"
    out_bytes = x.numel() * 2
    return Case(op, f"b{b} d{d} l{l} w{w}", fwd, [x, weight, bias], _nbytes(x, weight, bias) + out_bytes, out_bytes)


def make_case(op: str, dims: tuple, device: torch.device, small: bool) -> Case:
    if op == "selective_scan":
        return scan_case(*dims, device)
    if op == "ssd":
        return ssd_case(*dims, device, SSD_CHUNK_SMALL if small else SSD_CHUNK)
    return conv_case(*dims, device, torch_baseline=op == "torch_conv1d_silu")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="one shape per op (the first of ANCHORS.md's)")
    p.add_argument("--ops", default="selective_scan,ssd,causal_conv1d,torch_conv1d_silu",
                   help="ops to run (comma list of selective_scan, ssd, causal_conv1d, torch_conv1d_silu)")
    p.add_argument("--no-backward", action="store_true", help="forward passes only")
    p.add_argument("--repeats", type=int, default=10,
                   help="CPU only: timed calls per measurement (median; 3 with --small)")


def run(args) -> dict:
    device = pick_device(args.device)
    ops = set(parse_list(args.ops))
    cases = [(op, dims) for op, dims in (SMALL if args.small else QUICK if args.quick else FULL) if op in ops]
    repeats = 3 if args.small else args.repeats
    timer = "triton.testing.do_bench median" if device.type == "cuda" else f"perf_counter median of {repeats}"
    settings = {"cases": [f"{op} {dims}" for op, dims in cases], "backward": not args.no_backward,
                "ssd_chunk": SSD_CHUNK_SMALL if args.small else SSD_CHUNK, "dtype": "bf16 (A, D, dt bias fp32)",
                "timer": timer, "small": bool(args.small), "quick": bool(args.quick)}
    rec = Record("kernels", device, settings)
    copy = rec.attempt("copy bandwidth", lambda: copy_bandwidth_gbs(device, 2**23 if args.small else None))
    settings["copy_gbs"] = copy
    official = is_h100(device)
    for op, dims in cases:
        case = rec.attempt(f"{op} {dims} inputs", lambda: make_case(op, dims, device, args.small))
        if case is None:
            continue
        passes = ["fwd"] + (["fwd+bwd"] if op in BACKWARD_OPS and not args.no_backward else [])
        for kind in passes:
            row = rec.attempt(f"{op} {case.shape} {kind}", lambda: _measure(case, kind, device, repeats))
            if row is not None:
                _add_ratios(row, case, kind, copy, official)
                rec.rows.append(row)
                log(f"[kernels] {op} {case.shape} {kind}: {row['ms']:.4g} ms, {row['gbs']:.4g} GB/s")
        del case
        free_memory(device)
    if not official:
        rec.notes.append("official figures are shown only on an H100 (ANCHORS.md was measured on one)")
    return rec.payload()


def _measure(case: Case, kind: str, device: torch.device, repeats: int) -> dict:
    if kind == "fwd":
        def fn():
            with torch.no_grad():
                return case.forward()
        nbytes = case.fwd_bytes
    else:
        dout = torch.randn(case.forward().shape, device=device, dtype=F32).to(BF16)

        def fn():
            for t in case.leaves:
                t.grad = None
            case.forward().backward(dout)
        nbytes = case.fwd_bwd_bytes
    ms = kernel_ms(fn, device, repeats)
    return {"op": case.op, "shape": case.shape, "pass": kind, "ms": ms, "min_bytes": nbytes,
            "gbs": nbytes / (ms * 1e-3) / 1e9}


def _add_ratios(row: dict, case: Case, kind: str, copy: float | None, official: bool) -> None:
    row["copy_fraction"] = row["gbs"] / copy if copy else None
    ref = OFFICIAL.get((case.op, case.shape))
    ref_ms = None if ref is None or not official else ref[0] if kind == "fwd" else ref[1]
    row["official_ms"] = ref_ms
    # > 1: mambakit is faster than the official CUDA/Triton kernel at this shape
    row["speedup_vs_official"] = ref_ms / row["ms"] if ref_ms else None


def text(payload: dict) -> str:
    copy = payload["settings"].get("copy_gbs")
    title = f"kernels on {payload['env']['device']}; copy bandwidth {report.fmt(copy, '.0f')} GB/s"
    cols = [("op", "op", ""), ("shape", "shape", ""), ("pass", "pass", ""), ("ms", "ms", ".4g"),
            ("GB/s", "gbs", ".4g"), ("of copy", "copy_fraction", ".0%"), ("official ms", "official_ms", ".4g"),
            ("vs official", "speedup_vs_official", ".2f")]
    return report.table(payload["results"], cols, title)


def plots(payload: dict, out_dir: str, name: str) -> list[str]:
    rows = [r for r in payload["results"] if r["pass"] == "fwd"]
    if not rows:
        return []
    copy = payload["settings"].get("copy_gbs") or 1.0
    groups = {"mambakit": [r["gbs"] / copy for r in rows]}
    if any(r.get("official_ms") for r in rows):  # the official kernels' GB/s over the copy bandwidth measured here
        groups["official (ANCHORS.md)"] = [r["min_bytes"] / (r["official_ms"] * 1e-3) / 1e9 / copy
                                           if r.get("official_ms") else None for r in rows]
    path = report.bar_plot(os.path.join(out_dir, f"{name}.png"), [f"{r['op']}\n{r['shape']}" for r in rows],
                           groups, "fraction of measured copy bandwidth (fwd)",
                           f"kernels, forward: {payload['env']['device']}")
    return [path] if path else []
