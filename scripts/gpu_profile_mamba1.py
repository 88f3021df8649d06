"""Runs the Mamba-1 selective scan at b4 d3072 l4096 (bf16, n 16, z, D, delta bias + softplus, B/C per step) a few
times, for a profiler to attach to (scripts/gpu_profile.sh runs it under Nsight Compute).

  python3 scripts/gpu_profile_mamba1.py --mode fwd   # forward, no grad (the inference forward kernel)
  python3 scripts/gpu_profile_mamba1.py --mode fb    # forward + backward (the saving forward and the backward)
"""
import argparse

import torch

from mambakit.ops import selective_scan_fn


def inputs(b, d, l, grad):
    """The scan's inputs (dict) and an output gradient, on the GPU."""
    n, dev, bf = 16, "cuda", torch.bfloat16
    torch.manual_seed(0)
    x = dict(u=torch.randn(b, d, l, device=dev, dtype=bf), delta=(torch.randn(b, d, l, device=dev) * 0.5 - 1).to(bf),
             A=-torch.exp(torch.randn(d, n, device=dev) * 0.5), B=torch.randn(b, n, l, device=dev, dtype=bf),
             C=torch.randn(b, n, l, device=dev, dtype=bf), D=torch.randn(d, device=dev),
             z=torch.randn(b, d, l, device=dev, dtype=bf), delta_bias=torch.randn(d, device=dev) * 0.3)
    for v in x.values():
        v.requires_grad_(grad)
    return x, torch.randn(b, d, l, device=dev, dtype=bf)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("fwd", "fb"), default="fwd")
    ap.add_argument("--shape", default="4,3072,4096", help="b,d,l")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)
    grad = args.mode == "fb"
    x, dout = inputs(*(int(s) for s in args.shape.split(",")), grad)
    for _ in range(args.iters):
        with torch.set_grad_enabled(grad):
            out = selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                                    delta_bias=x["delta_bias"], delta_softplus=True)
            if grad:
                out.backward(dout)
    torch.cuda.synchronize()
    print("done", args.mode, tuple(out.shape), float(out.float().abs().mean()))


if __name__ == "__main__":
    main()
