"""Offline SASS of a Triton kernel launch, without a GPU: instruction counts for sm_90 (H100 / H200).

    python scripts/sass_count.py mamba1-fwd [--b 4 --d 3072 --l 4096] [--set steps=8 ...] [--dump DIR]

Runs one of mambakit's launchers on CPU tensors with Triton's driver replaced by a stand-in that reports an
sm_90 target and with every launch turned into a compile-only warmup, so the kernels are compiled with the
specialisation a real launch of those shapes would get (16-byte alignment, ints divisible by 16, ints equal
to 1 as constants). Prints per kernel the instruction count of its SASS (nvdisasm, bundled with Triton), the
opcode histogram, registers and spills; --dump writes the TTGIR, PTX and SASS. Needs triton (not the
interpreter). A guide for issue-bound kernels: counts are static (one pass of the code, not per step), and
the GPU still decides.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.jit as jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

COMPILED = []


class _Sm90Driver:
    """Just what JITFunction.run asks of a driver before it would launch."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("cpu")


def compile_only():
    """Every JIT launch from here on compiles (for sm_90) and records the kernel instead of launching it."""
    triton.runtime.driver.set_active(_Sm90Driver())
    run = jit.JITFunction.run

    def compile_run(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED.append((self.fn.__name__, kernel))
        return kernel

    jit.JITFunction.run = compile_run


def sass_of(kernel) -> tuple[str, str]:
    """(SASS, resource usage line: registers, stack, shared memory) of a compiled kernel's cubin."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    path = Path("/tmp") / f"sass_count_{os.getpid()}.cubin"
    path.write_bytes(kernel.asm["cubin"])
    try:
        sass = subprocess.run([str(bin_dir / "nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([str(bin_dir / "cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                             text=True).stdout
        usage = next((line.strip() for line in res.splitlines() if "REG:" in line), "resource usage: n/a")
        return sass, usage
    finally:
        path.unlink()


def histogram(sass: str) -> collections.Counter:
    op = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T] )?([A-Z][A-Z0-9_]*)", re.M)
    return collections.Counter(m.group(1) for m in op.finditer(sass))


def mamba1_fwd(args, overrides):
    """The Mamba-1 time-parallel forward (bf16 u/delta/z/B/C per step, fp32 A/D/delta_bias, z, D,
    delta bias + softplus), with the saved states of a training forward."""
    from mambakit.ops import _triton_scan_time as tk

    b, d, l, n = args.b, args.d, args.l, 16
    bf = dict(dtype=torch.bfloat16)
    u, delta, z = (torch.randn(b, d, l, **bf) for _ in range(3))
    B, C = torch.randn(b, 1, n, l, **bf), torch.randn(b, 1, n, l, **bf)
    A, D, bias = -torch.rand(d, n), torch.randn(d), torch.randn(d)
    tk.scan_fwd_time(u, delta, A, B, C, D, z, bias, None, None, True, True, **overrides)


def mamba1_bwd(args, overrides):
    """The Mamba-1 time-parallel backward of the same inputs, from the forward's saved states (the busy-grid
    plan where b * d fills the GPU, as on a real launch); overrides are BWD_TIME_CONFIG keys."""
    from mambakit.ops import _triton_scan_time as tk
    from mambakit.ops import _triton_scan_time_bwd as tb

    b, d, l, n = args.b, args.d, args.l, 16
    bf = dict(dtype=torch.bfloat16)
    u, delta, z, dout = (torch.randn(b, d, l, **bf) for _ in range(4))
    B, C = torch.randn(b, 1, n, l, **bf), torch.randn(b, 1, n, l, **bf)
    A, D, bias = -torch.rand(d, n), torch.randn(d), torch.randn(d)
    seg = tk._launch_meta(tk.FWD_TIME_CONFIG, u, B)
    seg = seg["SEG_ROWS"] * seg["K"]
    states = torch.zeros(b, -(-l // seg), d, n)
    tb.scan_bwd_time(u, delta, A, B, C, D, z, bias, None, states, seg, dout, None, True, **overrides)


JOBS = {"mamba1-fwd": mamba1_fwd, "mamba1-bwd": mamba1_bwd}


def parse_overrides(items) -> dict:
    """Config overrides from KEY=VALUE strings: True / False / None, an int, else the string."""
    overrides = {}
    for kv in items:
        key, value = kv.split("=", 1)
        overrides[key] = {"True": True, "False": False, "None": None}.get(value, value)
        if isinstance(overrides[key], str) and value.lstrip("-").isdigit():
            overrides[key] = int(value)
    return overrides


def each_override(cfg: dict, specs):
    """Sets the config dict cfg to its defaults plus each spec's overrides ("KEY=VALUE[,KEY=VALUE...]"), for "" (the
    defaults), every spec, then "" again, yielding the spec; cfg is restored afterwards."""
    base = dict(cfg)
    try:
        for spec in [""] + list(specs) + [""]:
            cfg.clear()
            cfg.update(base, **parse_overrides(filter(None, spec.split(","))))
            yield spec
    finally:
        cfg.clear()
        cfg.update(base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", choices=sorted(JOBS))
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--d", type=int, default=3072)
    ap.add_argument("--l", type=int, default=4096)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE (ints, True/False, None)")
    ap.add_argument("--dump", default=None, help="folder for the TTGIR, PTX and SASS of each kernel")
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.set)
    compile_only()
    JOBS[args.job](args, overrides)
    for name, kernel in COMPILED:
        sass, usage = sass_of(kernel)
        ops = histogram(sass)
        print(f"{name}: {sum(ops.values())} instructions, {kernel.metadata.num_warps} warps; {usage}")
        print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(24)))
        if args.dump:
            out = Path(args.dump)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.sass").write_text(sass)
            (out / f"{name}.ttgir").write_text(kernel.asm["ttgir"])
            (out / f"{name}.ptx").write_text(kernel.asm["ptx"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
