"""`mambakit bench train`: training throughput of the language model at the 130m shape.

One step = forward with the loss under bf16 autocast (fp32 parameters), backward, fused AdamW step, as in
ANCHORS.md's official figures. tokens/s = batch x seqlen / median step time; peak memory over the timed steps.
"""

from __future__ import annotations

import argparse
import os

import torch

from . import report
from .common import (Record, free_memory, is_h100, log, median, parse_list, parse_shape, peak_gb, pick_device,
                     reset_peak, wall_ms)
from .models import MAMBA_VOCAB, build_mamba, layer_name, mamba_sized

# ANCHORS.md, official mamba-ssm on an H100: tokens/s at b8x2048 and b2x8192, peak GB.
OFFICIAL = {("Mamba1", "8x2048"): 156733, ("Mamba1", "2x8192"): 150050,
            ("Mamba2", "8x2048"): 100729, ("Mamba2", "2x8192"): 108145}
OFFICIAL_PEAK_GB = {"Mamba1": 19.1, "Mamba2": 19.2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="130m", help="model size (default 130m: d_model 768, 24 layers)")
    p.add_argument("--layers", default="mamba1,mamba2", help="mixers: mamba1, mamba2")
    p.add_argument("--shapes", default="8x2048,2x8192", help="batch x seqlen per step (comma list)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median step time reported)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first (kernel compilation, autotuning, optimizer state)")
    p.add_argument("--no-autocast", action="store_true", help="train in fp32 instead of bf16 autocast")


def settings_of(args) -> dict:
    small = bool(args.small)
    return {"size": "tiny" if small else args.size, "layers": [layer_name(x) for x in parse_list(args.layers)],
            "shapes": ["2x64"] if small else parse_list(args.shapes), "steps": 2 if small else args.steps,
            "warmup": 1 if small else args.warmup, "autocast": "none" if args.no_autocast else "bfloat16",
            "params": "float32", "optimizer": "AdamW(lr=3e-4, weight_decay=0.1), fused when available",
            "small": small}


def make_optimizer(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, bool]:
    params = list(model.parameters())
    try:
        return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, fused=True), True
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1), False


def train_steps(model, batch: int, seqlen: int, s: dict, device: torch.device) -> dict:
    """Median step time, tokens/s and peak memory of ``steps`` timed steps after ``warmup`` ones."""
    opt, fused = make_optimizer(model)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seqlen), device=device)
    use_amp = s["autocast"] == "bfloat16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(s["warmup"]):
        step()
    reset_peak(device)
    times = [wall_ms(step, device) for _ in range(s["steps"])]
    ms = median(times)
    del opt
    return {"step_ms": ms, "tokens_per_s": batch * seqlen / (ms * 1e-3), "peak_gb": peak_gb(device),
            "fused_adamw": fused, "times_ms": times}


def run(args) -> dict:
    device = pick_device(args.device)
    s = settings_of(args)
    rec = Record("train", device, s)
    official = is_h100(device)
    for layer in s["layers"]:
        for shape in s["shapes"]:
            batch, seqlen = parse_shape(shape)
            torch.manual_seed(args.seed)
            config = mamba_sized(layer, s["size"], vocab_size=1024 if s["small"] else MAMBA_VOCAB)
            model = rec.attempt(f"{layer} build", lambda: build_mamba(config, device, torch.float32).train())
            if model is None:
                continue
            res = rec.attempt(f"{layer} {shape}", lambda: train_steps(model, batch, seqlen, s, device))
            if res is not None:
                row = {"layer": layer, "shape": shape, **res,
                       "official_tokens_per_s": OFFICIAL.get((layer, shape)) if official else None,
                       "official_peak_gb": OFFICIAL_PEAK_GB.get(layer) if official else None}
                if row["official_tokens_per_s"]:
                    row["vs_official"] = row["tokens_per_s"] / row["official_tokens_per_s"]
                rec.rows.append(row)
                log(f"[train] {layer} {shape}: {row['tokens_per_s']:,.0f} tokens/s, step {row['step_ms']:.1f} ms")
            del model
            free_memory(device)
    if not official:
        rec.notes.append("official figures (ANCHORS.md) are attached only on an H100")
    return rec.payload()


def text(payload: dict) -> str:
    cols = [("layer", "layer", ""), ("shape", "shape", ""), ("tokens/s", "tokens_per_s", ",.0f"),
            ("step ms", "step_ms", ".1f"), ("peak GB", "peak_gb", ".2f"),
            ("official tok/s", "official_tokens_per_s", ",d"), ("vs official", "vs_official", ".2f"),
            ("official GB", "official_peak_gb", ".1f")]
    return report.table(payload["results"], cols, f"train on {payload['env']['device']}")


def plots(payload: dict, out_dir: str, name: str) -> list[str]:
    rows = payload["results"]
    if not rows:
        return []
    groups = {"mambakit": [r["tokens_per_s"] for r in rows]}
    if any(r.get("official_tokens_per_s") for r in rows):
        groups["official mamba-ssm"] = [r.get("official_tokens_per_s") for r in rows]
    path = report.bar_plot(os.path.join(out_dir, f"{name}.png"), [f"{r['layer']} {r['shape']}" for r in rows],
                           groups, "training tokens/s", f"training throughput: {payload['env']['device']}")
    return [path] if path else []
