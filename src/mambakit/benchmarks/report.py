"""Tables and plots of benchmark results, drawn from the saved JSON payloads (so they can be redrawn later
on another machine: ``mambakit bench summary DIR`` / ``mambakit bench plot DIR``)."""

from __future__ import annotations

import glob
import json
import os
from typing import Callable


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | int):
        return format(value, spec)
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str | Callable, str]], title: str = "") -> str:
    """Plain-text table. columns: (header, row key or function of the row, format spec)."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append([fmt(key(row) if callable(key) else row.get(key), spec) for _, key, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    text_col = [spec == "" for _, _, spec in columns]  # text left-aligned, numbers right-aligned
    lines = [title] if title else []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if text_col[i] else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def errors_text(payload: dict) -> str:
    errs = payload.get("errors") or []
    if not errs:
        return ""
    return "\n".join([f"{len(errs)} measurement(s) failed:"] + [f"  {e['what']}: {e['error'][:200]}" for e in errs])


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def loglog_plot(path: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str) -> str | None:
    """One log-log figure, a line per series name -> (xs, ys); points with y None are left out."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bar_plot(path: str, labels: list[str], groups: dict[str, list], ylabel: str, title: str) -> str | None:
    """Grouped bars: one group per label, one bar per series in ``groups``."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(labels) + 2), 4.4))
    width = 0.8 / max(1, len(groups))
    for i, (name, values) in enumerate(groups.items()):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [v or 0 for v in values], width=width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_payloads(directory: str) -> list[dict]:
    payloads = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError:
                continue
        if isinstance(data, dict) and "benchmark" in data:
            data["_path"] = path
            payloads.append(data)
    return payloads
