"""Times the Mamba-1 scan's forward + backward at b4 d3072 l4096 (bf16, n 16, z, D, delta bias + softplus, B/C
per step) under BWD_TIME_CONFIG overrides, all in one process, the defaults first and again last:

  python3 scripts/gpu_time_scan_bwd.py "maxnreg=168" "maxnreg=192"
  python3 scripts/gpu_time_scan_bwd.py --shape 1,3072,65536 "ahead=0"   (another b,d,l)
"""
import sys

import triton
from gpu_profile_mamba1 import inputs
from sass_count import each_override

from mambakit.ops import _triton_scan_time_bwd as tb
from mambakit.ops import selective_scan_fn


def main(argv):
    shape = (4, 3072, 4096)
    if argv[:1] == ["--shape"]:
        shape, argv = tuple(int(v) for v in argv[1].split(",")), argv[2:]
    print(f"b{shape[0]} d{shape[1]} l{shape[2]}", flush=True)
    x, dout = inputs(*shape, grad=True)

    def fb():
        selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], delta_bias=x["delta_bias"],
                          delta_softplus=True).backward(dout)

    rows = []
    for spec in each_override(tb.BWD_TIME_CONFIG, argv):
        for v in x.values():
            v.grad = None
        fb()
        ref = {k: v.grad.clone() for k, v in x.items()}
        ms = triton.testing.do_bench(fb, grad_to_none=list(x.values()))
        if rows:  # same gradients as the first (default) run
            err = max(float((ref[k].float() - r0[k].float()).norm() / r0[k].float().norm()) for k in ref)
        else:
            r0, err = ref, 0.0
        rows.append((spec or "default", ms, err))
        print(f"{spec or 'default':30s} fwd+bwd {ms:7.3f} ms  grad rel diff vs default {err:.1e}", flush=True)
    print("\n".join(f"{s:30s} {ms:7.3f} ms  {ms / rows[0][1]:.3f}x" for s, ms, _ in rows))


if __name__ == "__main__":
    main(sys.argv[1:])
