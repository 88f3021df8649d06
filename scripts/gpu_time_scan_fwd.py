"""Times the Mamba-1 scan's forward (b4 d3072 l4096 and b1 d3072 l65536; with --fb also fwd+bwd at b4) under
FWD_TIME_CONFIG overrides, all in one process, the defaults first and again last (bf16, n 16, z, D, delta bias
+ softplus, B/C per step). Each variant's output, last state (and with --fb gradients) are compared with the
defaults' (options that only move loads must match bit for bit):

  python3 scripts/gpu_time_scan_fwd.py [--fb] "ahead=4" "ahead=8,maxnreg=128"
"""
import sys

import torch
import triton
from gpu_profile_mamba1 import inputs
from sass_count import each_override

from mambakit.ops import _triton_scan_time as tk
from mambakit.ops import selective_scan_fn


def run(x, dout=None):
    out, last = selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                                  delta_bias=x["delta_bias"], delta_softplus=True, return_last_state=True)
    if dout is not None:
        out.backward(dout)
    return out, last


def diff(a, b):
    return float((a.float() - b.float()).abs().max())


def main(argv):
    fb = "--fb" in argv
    specs = [a for a in argv if a != "--fb"]
    shapes = [(4, 3072, 4096, False), (1, 3072, 65536, False)] + ([(4, 3072, 4096, True)] if fb else [])
    rows = []
    for b, d, l, grad in shapes:
        x, dout = inputs(b, d, l, grad)
        name = f"b{b} l{l}" + (" fwd+bwd" if grad else " fwd")
        ref = None
        for spec in each_override(tk.FWD_TIME_CONFIG, specs):
            for v in x.values():
                v.grad = None
            with torch.set_grad_enabled(grad):
                out, last = run(x, dout if grad else None)
            got = [out.detach(), last.detach()] + ([x[k].grad.clone() for k in sorted(x)] if grad else [])
            if ref is None:
                ref, err = got, 0.0
            else:
                err = max(diff(g, r) for g, r in zip(got, ref))
            del out, last
            if grad:
                ms = triton.testing.do_bench(lambda: run(x, dout), grad_to_none=list(x.values()))
            else:
                with torch.no_grad():
                    ms = triton.testing.do_bench(lambda: run(x))
            rows.append((name, spec or "default", ms, err))
            print(f"{name:20s} {spec or 'default':30s} {ms:7.3f} ms  max abs diff vs default {err:.1e}", flush=True)
        del x, dout
        torch.cuda.empty_cache()
    first = {}
    for name, spec, ms, err in rows:
        first.setdefault(name, ms)
        print(f"{name:20s} {spec:30s} {ms:7.3f} ms  {ms / first[name]:.3f}x  diff {err:.1e}")


if __name__ == "__main__":
    main(sys.argv[1:])
