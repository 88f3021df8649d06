"""`mambakit bench cpu-vs-hf`: mambakit against transformers' pure-PyTorch Mamba models on the same weights.

Issue 2's claim: on CPU, a forward pass of 2 x 1024 tokens through a 4-layer, d_model 256 model (vocab 1024)
and greedy decoding are at least 2x faster than transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM``.
Both models hold the same weights (checked: their logits must agree before anything is timed), run in one
process, and their repeats are interleaved so that load from other jobs hits both alike.
"""

from __future__ import annotations

import argparse
import os

import torch

from . import report
from .common import Record, interleaved_ms, log, median, parse_list
from .decoding import hf_generate_fn, mambakit_generate_fn, time_decode
from .models import build_mamba, hf_twin, layer_name, mamba_config

FULL = {"d_model": 256, "n_layer": 4, "vocab_size": 1024, "batch": 2, "seqlen": 1024, "prompt": 16,
        "new_tokens": 64, "repeats": 7}
SMALL = {"d_model": 64, "n_layer": 2, "vocab_size": 256, "batch": 1, "seqlen": 64, "prompt": 4,
         "new_tokens": 4, "repeats": 1}
# Mamba-2 small: fewer, narrower heads and a small state so that the tiny run stays quick.
SMALL_MAMBA2 = {"headdim": 32, "d_state": 16}
# ANCHORS.md, this project's 2-core CPU machines: transformers' forward 2x1024, and Mamba-1 greedy 64 after 16.
ANCHOR_HF_FORWARD_MS = {"Mamba1": 780.0, "Mamba2": 300.0}
ANCHOR_HF_GENERATE_MS = {"Mamba1": 320.0}
GOAL = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", default="mamba1,mamba2", help="mixers to compare: mamba1, mamba2 (comma list)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement, median reported "
                   "(default 7; 1 with --small)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="largest relative L2 difference of the two models' logits accepted as equal weights")
    p.add_argument("--no-decode", action="store_true", help="time the forward pass only")


def settings_of(args) -> dict:
    s = dict(SMALL if args.small else FULL)
    if args.repeats:
        s["repeats"] = args.repeats
    s.update(layers=[layer_name(x) for x in parse_list(args.layers)], tol=args.tol, decode=not args.no_decode,
             dtype="float32", small=bool(args.small))
    return s


def build_pair(layer: str, s: dict, device: torch.device, small: bool):
    """A mambakit model with random weights and transformers' twin holding the same weights."""
    ssm = SMALL_MAMBA2 if small and layer == "Mamba2" else {}
    model = build_mamba(mamba_config(layer, s["d_model"], s["n_layer"], s["vocab_size"], **ssm), device,
                        torch.float32)
    return model, hf_twin(model)


def logits_rel_err(model, hf, ids: torch.Tensor) -> float:
    """Relative L2 difference of the two models' logits on ids (the weight-equivalence check)."""
    with torch.inference_mode():
        ours = model(ids).logits.double()
        theirs = hf(ids, use_cache=False).logits.double()
    return float((ours - theirs).norm() / theirs.norm())


def run(args) -> dict:
    device = torch.device("cpu") if args.device == "auto" else torch.device(args.device)
    s = settings_of(args)
    rec = Record("cpu_vs_hf", device, s)
    rec.notes.append("speedup = transformers median / mambakit median, same weights, interleaved repeats; "
                     f"goal >= {GOAL}x. The machine may be shared with other jobs: compare the medians' ratio.")
    for layer in s["layers"]:
        torch.manual_seed(args.seed)
        pair = rec.attempt(f"{layer} build", lambda: build_pair(layer, s, device, s["small"]))
        if pair is None:
            continue
        model, hf = pair
        ids = torch.randint(0, s["vocab_size"], (s["batch"], s["seqlen"]), device=device)
        err = rec.attempt(f"{layer} logits check", lambda: logits_rel_err(model, hf, ids))
        log(f"[cpu_vs_hf] {layer}: logits relative difference {err}")
        if err is None:
            continue
        if not err <= s["tol"]:
            rec.errors.append({"what": f"{layer} weights check", "error": f"logits differ by {err:.3g} > tol "
                               f"{s['tol']}: not the same function, so not timed"})
            continue
        rec.attempt(f"{layer} forward", lambda: rec.rows.append(_forward_row(layer, model, hf, ids, s, device, err)))
        if s["decode"]:
            rec.attempt(f"{layer} decode", lambda: rec.rows.append(_decode_row(layer, model, hf, s, device)))
    return rec.payload()


def _forward_row(layer, model, hf, ids, s, device, err) -> dict:
    with torch.inference_mode():
        times = interleaved_ms({"mambakit": lambda: model(ids).logits,
                                "transformers": lambda: hf(ids, use_cache=False).logits}, device, s["repeats"])
    ours, theirs = median(times["mambakit"]), median(times["transformers"])
    row = {"layer": layer, "measure": f"forward {s['batch']}x{s['seqlen']}", "mambakit_ms": ours,
           "transformers_ms": theirs, "speedup": theirs / ours, "goal": GOAL, "logits_rel_err": err,
           "anchor_transformers_ms": None if s["small"] else ANCHOR_HF_FORWARD_MS.get(layer),
           "mambakit_ms_all": times["mambakit"], "transformers_ms_all": times["transformers"]}
    log(f"[cpu_vs_hf] {layer} forward: mambakit {ours:.1f} ms, transformers {theirs:.1f} ms, "
        f"{row['speedup']:.2f}x")
    return row


def _decode_row(layer, model, hf, s, device) -> dict:
    ids = torch.randint(0, s["vocab_size"], (1, s["prompt"]), device=device)
    n = s["new_tokens"]
    stats = time_decode({"mambakit": lambda k: mambakit_generate_fn(model, ids, k, cg=False),
                         "transformers": lambda k: hf_generate_fn(hf, ids, k)},
                        s["prompt"], n, 1, device, s["repeats"])
    ours, theirs = stats["mambakit"], stats["transformers"]
    same = bool(torch.equal(ours["sequences"].cpu(), theirs["sequences"].cpu()))
    row = {"layer": layer, "measure": f"greedy {n} after {s['prompt']}, per token",
           "mambakit_ms": ours["decode_ms_per_token"], "transformers_ms": theirs["decode_ms_per_token"],
           "speedup": theirs["decode_ms_per_token"] / ours["decode_ms_per_token"], "goal": GOAL,
           "same_tokens": same, "mambakit_total_ms": ours["total_ms"], "transformers_total_ms": theirs["total_ms"],
           "anchor_transformers_total_ms": None if s["small"] else ANCHOR_HF_GENERATE_MS.get(layer),
           "mambakit_ms_all": ours["tn_ms_all"], "transformers_ms_all": theirs["tn_ms_all"],
           "mambakit_t1_ms_all": ours["t1_ms_all"], "transformers_t1_ms_all": theirs["t1_ms_all"]}
    log(f"[cpu_vs_hf] {layer} decode: mambakit {row['mambakit_ms']:.2f} ms/token, transformers "
        f"{row['transformers_ms']:.2f} ms/token, {row['speedup']:.2f}x, same tokens: {same}")
    return row


def text(payload: dict) -> str:
    cols = [("layer", "layer", ""), ("measure", "measure", ""), ("mambakit ms", "mambakit_ms", ".2f"),
            ("transformers ms", "transformers_ms", ".2f"), ("speedup", "speedup", ".2f"),
            ("goal", "goal", ".1f"), ("met", lambda r: r["speedup"] >= r["goal"], ""),
            ("total ms (ours/theirs)", _totals, ""),
            ("ANCHORS HF ms (fwd or total)", _anchor, ".0f")]
    return report.table(payload["results"], cols, f"cpu-vs-hf on {payload['env']['device']}")


def _anchor(row: dict) -> float | None:
    """transformers' time measured for ANCHORS.md on an idle machine: far below ours means a loaded machine."""
    return row.get("anchor_transformers_ms") or row.get("anchor_transformers_total_ms")


def _totals(row: dict) -> str | None:
    if "mambakit_total_ms" not in row:
        return None
    return f"{row['mambakit_total_ms']:.0f}/{row['transformers_total_ms']:.0f}"


def plots(payload: dict, out_dir: str, name: str) -> list[str]:
    rows = payload["results"]
    if not rows:
        return []
    path = report.bar_plot(os.path.join(out_dir, f"{name}.png"),
                           [f"{r['layer']} {r['measure']}" for r in rows],
                           {"mambakit": [r["mambakit_ms"] for r in rows],
                            "transformers": [r["transformers_ms"] for r in rows]},
                           "ms (median)", f"CPU, same weights: {payload['env']['cpu']}")
    return [path] if path else []
