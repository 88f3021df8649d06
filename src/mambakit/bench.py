"""`mambakit bench <what>`: speed and memory measurements, printed as tables and saved as JSON (+ PNG plots).

Sub-commands:
  cpu-vs-hf  CPU forward and greedy decoding against transformers' pure-PyTorch Mamba, same weights (issue 2)
  kernels    per-op times, GB/s and fraction of copy bandwidth at the official benchmark shapes (issues 4/5)
  generate   decode ms/token, tokens/s, prefill, memory: Mamba-1/2 against a Pythia-shaped Transformer
  scaling    forward time and memory from 1K to 1M tokens; decode state bytes against a KV cache
  train      training tokens/s and peak memory at the 130m shape
  summary    print the tables of a results folder;  plot: redraw its PNGs

Every measurement that fails is recorded in the JSON's "errors" and the rest goes on. ``--small`` runs tiny
settings that finish in seconds on a CPU (what the tests use); the defaults are the GPU settings.
Each JSON holds the device name, library versions, settings and results; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# sub-command -> (module in mambakit.benchmarks, JSON file name, help)
SUBCOMMANDS = {
    "cpu-vs-hf": ("cpu_vs_hf", "cpu_vs_hf", "CPU: mambakit vs transformers' pure-PyTorch Mamba on the same weights"),
    "kernels": ("kernels", "kernels", "per-op kernel times, GB/s, fraction of copy bandwidth, official figures"),
    "generate": ("generate", "generate", "decode ms/token, tokens/s, prefill, memory vs a Transformer"),
    "scaling": ("scaling", "scaling", "forward time/memory vs sequence length (to 1M), decode memory vs context"),
    "train": ("train", "train", "training tokens/s and peak memory at the 130m shape"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambakit bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subs = parser.add_subparsers(dest="what", metavar="<what>")
    for name, (module, _, help_) in SUBCOMMANDS.items():
        p = subs.add_parser(name, help=help_, description=help_)
        _common_arguments(p)
        importlib.import_module(f"mambakit.benchmarks.{module}").add_arguments(p)
    for name, help_ in (("summary", "print the tables of every JSON in a results folder"),
                        ("plot", "(re)draw the PNG plots of every JSON in a results folder (needs matplotlib)")):
        p = subs.add_parser(name, help=help_, description=help_)
        p.add_argument("dir", nargs="?", default="bench_results", help="results folder (default ./bench_results)")
    return parser


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench_results", help="folder for the JSON and PNG files (default ./bench_results)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when available; "
                   "cpu-vs-hf defaults to cpu)")
    p.add_argument("--small", action="store_true", help="tiny settings that run in seconds on a CPU (for tests)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and inputs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for this run (default: torch's "
                   "choice; on a shared machine 1 thread gives steadier CPU timings)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG files")
    p.add_argument("--name", default=None, help="JSON/PNG base name (default: the sub-command's), e.g. to keep "
                   "two runs of one sub-command apart")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.what is None:
        parser.print_help()
        return 0
    if args.what in ("summary", "plot"):
        return _summary(args.dir) if args.what == "summary" else _plot_dir(args.dir)
    import torch

    from .benchmarks.common import Record, write_json

    module_name, json_name, _ = SUBCOMMANDS[args.what]
    module = importlib.import_module(f"mambakit.benchmarks.{module_name}")
    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    Record.active = None
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        payload = module.run(args)
    except KeyboardInterrupt:  # e.g. `timeout -s INT`: keep the measurements made so far
        if Record.active is None:
            raise
        Record.active.notes.append("interrupted (time limit or Ctrl-C): the results so far")
        payload = Record.active.payload()
    finally:
        torch.set_num_threads(threads)
    name = args.name or json_name
    path = write_json(args.out, name, payload)
    print(module.text(payload))
    _print_problems(payload)
    if not args.no_plots:
        _plots(module, payload, args.out, name)
    print(f"results: {path}")
    return 0


def _print_problems(payload: dict) -> None:
    from .benchmarks.report import errors_text

    for note in payload.get("notes", []):
        print(f"note: {note}")
    text = errors_text(payload)
    if text:
        print(text)


def _plots(module, payload: dict, out_dir: str, name: str) -> list[str]:
    from .benchmarks.report import pyplot

    if pyplot() is None:
        print("plots skipped: matplotlib is not installed (pip install matplotlib; then `mambakit bench plot DIR`)")
        return []
    paths = module.plots(payload, out_dir, name)
    for path in paths:
        print(f"plot: {path}")
    return paths


def _modules_by_benchmark() -> dict:
    return {json_name: importlib.import_module(f"mambakit.benchmarks.{module}")
            for module, json_name, _ in SUBCOMMANDS.values()}


def _summary(directory: str) -> int:
    from .benchmarks.report import errors_text, load_payloads

    payloads = load_payloads(directory)
    if not payloads:
        print(f"no benchmark JSON files in {directory}", file=sys.stderr)
        return 1
    modules = _modules_by_benchmark()
    for payload in payloads:
        module = modules.get(payload["benchmark"])
        if module is None:
            continue
        print(f"\n== {os.path.basename(payload['_path'])} ({payload['env'].get('device')}) ==")
        print(module.text(payload))
        err = errors_text(payload)
        if err:
            print(err)
    return 0


def _plot_dir(directory: str) -> int:
    from .benchmarks.report import load_payloads

    modules = _modules_by_benchmark()
    for payload in load_payloads(directory):
        module = modules.get(payload["benchmark"])
        if module is not None:
            name = os.path.splitext(os.path.basename(payload["_path"]))[0]
            _plots(module, payload, directory, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
