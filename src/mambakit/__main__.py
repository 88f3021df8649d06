"""`mambakit <command> ...`: each command is a module with ``main(argv=None)``.

Commands are imported only when run, so `mambakit generate` does not pay for the training code.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": ("mambakit.inference.cli", "generate text from a prompt (streams to stdout)"),
    "train": ("mambakit.train", "train or fine-tune a Mamba language model on text files"),
    "eval": ("mambakit.eval", "perplexity and bits per byte of a model on a text file"),
    "bench": ("mambakit.bench", "benchmarks: kernels, generate, scaling, train"),
    "convert": ("mambakit.hub", "convert a checkpoint between the state-spaces and transformers layouts"),
}


def _usage() -> str:
    lines = ["usage: mambakit <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "run `mambakit <command> --help` for the options of a command"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"mambakit {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mambakit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
