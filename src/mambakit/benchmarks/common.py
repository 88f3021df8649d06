"""Shared pieces of the benchmarks: device and library versions, timers, peak memory, error capture, JSON.

Timing rules (ANCHORS.md): medians over repeats; kernels with ``triton.testing.do_bench`` on CUDA; anything
longer with CUDA-synchronised wall time; on CPU ``time.perf_counter``. When two implementations are compared
in one process their repeats are interleaved, so that noise from other jobs on a shared machine hits both.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch


# ---- device and environment ------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def env_info(device: torch.device) -> dict:
    """What a reader needs to judge a number: device, library versions, backend, date."""
    from .. import __version__
    from ..ops.dispatch import current_backend

    info = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "mambakit": __version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "mambakit_backend": current_backend(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    return info


def is_h100(device: torch.device) -> bool:
    return device.type == "cuda" and "H100" in torch.cuda.get_device_name(device)


# ---- timers -----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call of fn, in milliseconds, synchronised with the device before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                   warmup: int = 1) -> dict[str, list[float]]:
    """Time several functions in turn, repeat by repeat; returns each one's list of times (ms)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(wall_ms(fn, device))
    return times


def kernel_ms(fn: Callable[[], object], device: torch.device, repeats: int = 10) -> float:
    """Median time of a kernel call: ``triton.testing.do_bench`` on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        try:
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except TypeError:  # Triton versions without return_mode
            return float(do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0])
    fn()  # warm-up (allocator, first-call dispatch)
    return median(wall_ms(fn, device) for _ in range(repeats))


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second / 1e9) of a large bf16 tensor."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**26)
    src = torch.randn(nbytes // 2, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = kernel_ms(lambda: dst.copy_(src), device)
    del src, dst
    free_memory(device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---- memory ---------------------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak memory allocated by PyTorch since the last reset_peak (None on CPU, where it is not tracked)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---- one sub-command's record ----------------------------------------------------------------------------
@dataclass
class Record:
    """Settings, result rows, errors and notes of one sub-command; saved as one JSON file."""

    benchmark: str
    device: torch.device
    settings: dict
    rows: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    # The record being filled, so that an interrupted run (time limit, Ctrl-C) can still save what it has.
    active: ClassVar["Record | None"] = None

    def __post_init__(self) -> None:
        Record.active = self

    def attempt(self, label: str, fn: Callable[[], object]):
        """Run one measurement; an exception is recorded (OOM as 'OOM') and None returned, so the rest goes on."""
        try:
            return fn()
        except KeyboardInterrupt:
            raise
        except Exception as err:  # one failing measurement must not lose the others
            oom = is_oom(err)
            message = "OOM" if oom else f"{type(err).__name__}: {err}"
            self.errors.append({"what": label, "error": message[:2000],
                                "where": "" if oom else traceback.format_exc(limit=-3)[-2000:]})
            log(f"[{self.benchmark}] {label}: FAILED {message[:300]}")
            free_memory(self.device)
            return None

    def payload(self) -> dict:
        return {"benchmark": self.benchmark, "env": env_info(self.device), "settings": self.settings,
                "results": self.rows, "errors": self.errors, "notes": self.notes}


def log(msg: str) -> None:
    """Progress line on stderr (the tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def write_json(out_dir: str, name: str, payload: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=_json_default)
        f.write("\n")
    return path


def _json_default(obj):
    return str(obj) if isinstance(obj, torch.device | torch.dtype) else repr(obj)


def parse_list(text: str, cast=str) -> list:
    """'a,b,c' -> [cast(a), cast(b), cast(c)]; empty items dropped."""
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def parse_shape(text: str) -> tuple[int, int]:
    """'8x2048' -> (8, 2048): batch x sequence length."""
    try:
        b, l = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"shape {text!r} must be BATCHxSEQLEN, e.g. 8x2048") from None
    return b, l


def dtype_of(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise SystemExit(f"dtype {name!r} is not one of {sorted(table)}")
    return table[name]
