"""`mambakit bench generate --vs transformer`: Mamba-1 and Mamba-2 language models against a Transformer of the
same size (transformers' GPTNeoXForCausalLM with Pythia's shape, SDPA attention), random weights, same dtype.

For each model, batch and prompt length: decode ms/token = (t(n) - t(1)) / (n - 1) with n = 129 by default
(ANCHORS.md), tokens/s = batch / decode time, prefill = t(1), peak memory of the n-token run; plus a forward
pass at b8x2048 and the batch-1 floor (weight bytes / measured copy bandwidth). Models are timed one at a time
and freed in between, so each gets the whole device.
"""

from __future__ import annotations

import argparse
import os

import torch

from . import report
from .common import (Record, copy_bandwidth_gbs, dtype_of, free_memory, is_h100, log, parse_list, parse_shape,
                     pick_device)
from .decoding import forward_ms, hf_generate_fn, mambakit_generate_fn, time_decode
from .models import MAMBA_VOCAB, PYTHIA_VOCAB, build_mamba, mamba_sized, n_params, pythia, weight_bytes

# ANCHORS.md (H100, fp16): official decode b1 ms/token, b64-after-2048 tokens/s, prefill b64x2048 ms,
# forward b8x2048 ms; transformers' Pythia (eager attention, dynamic cache) for reference.
ANCHOR = {
    ("Mamba1", "130m"): {"decode_b1": 0.787, "tok_s_b64": 74046, "prefill_b64x2048": 142, "forward_b8x2048": 31.6},
    ("Mamba1", "2.8b"): {"decode_b1": 3.77, "tok_s_b64": 12591, "prefill_b64x2048": 1994, "forward_b8x2048": 252},
    ("Mamba2", "130m"): {"decode_b1": 0.649, "tok_s_b64": 45636, "prefill_b64x2048": 128, "forward_b8x2048": 55.8},
    ("Mamba2", "2.8b"): {"decode_b1": 3.63, "tok_s_b64": 6233, "prefill_b64x2048": 1805, "forward_b8x2048": 224},
    ("Transformer", "130m"): {"decode_b1": 11.9, "tok_s_b64": 4669, "forward_b8x2048": 16.8},
    ("Transformer", "2.8b"): {"decode_b1": 20.7, "tok_s_b64": 618, "forward_b8x2048": 218},
}
KINDS = {"mamba1": "Mamba1", "mamba2": "Mamba2", "transformer": "Transformer"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vs", choices=["transformer", "none"], default="transformer",
                   help="also time a Pythia-shaped Transformer of the same size (default) or not")
    p.add_argument("--sizes", default="130m", help="model sizes, comma list of 130m, 370m, 1.4b, 2.8b")
    p.add_argument("--layers", default="mamba1,mamba2", help="Mamba mixers to time: mamba1, mamba2")
    p.add_argument("--batches", default="1,64", help="batch sizes (comma list)")
    p.add_argument("--prompts", default="100,2048", help="prompt lengths (comma list)")
    p.add_argument("--new-tokens", type=int, default=129, help="n in (t(n) - t(1)) / (n - 1) (default 129)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    p.add_argument("--dtype", default=None, help="float16 (default on CUDA), bfloat16 or float32 (default on CPU)")
    p.add_argument("--no-cg", action="store_true", help="do not ask mambakit's generate for CUDA graphs")
    p.add_argument("--forward-shape", default="8x2048", help="also time one forward pass at BxL ('' to skip)")


def settings_of(args, device: torch.device) -> dict:
    small = bool(args.small)
    kinds = [KINDS[k.lower()] for k in parse_list(args.layers)] + (["Transformer"] if args.vs == "transformer" else [])
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    return {
        "sizes": ["tiny"] if small else parse_list(args.sizes), "kinds": kinds,
        "batches": [2] if small else parse_list(args.batches, int),
        "prompts": [8] if small else parse_list(args.prompts, int),
        "new_tokens": 4 if small else args.new_tokens, "repeats": 1 if small else args.repeats, "dtype": dtype,
        "cg": not args.no_cg, "forward_shape": "2x32" if small else args.forward_shape, "small": small,
        "vocab_size": 1024 if small else None,  # None: the real models' vocabularies (Mamba 50277, Pythia 50304)
    }


def build(kind: str, size: str, device, dtype, max_positions: int, vocab_size: int | None):
    if kind == "Transformer":
        return pythia(size, device, dtype, max_positions=max_positions, vocab_size=vocab_size or PYTHIA_VOCAB)
    return build_mamba(mamba_sized(kind, size, vocab_size=vocab_size or MAMBA_VOCAB), device, dtype)


def run(args) -> dict:
    device = pick_device(args.device)
    s = settings_of(args, device)
    rec = Record("generate", device, s)
    copy = rec.attempt("copy bandwidth", lambda: copy_bandwidth_gbs(device))
    s["copy_gbs"] = copy
    dtype = dtype_of(s["dtype"])
    max_pos = max(s["prompts"]) + s["new_tokens"] + 8
    for size in s["sizes"]:
        for kind in s["kinds"]:
            torch.manual_seed(args.seed)
            model = rec.attempt(f"{kind} {size} build",
                                lambda: build(kind, size, device, dtype, max_pos, s["vocab_size"]))
            if model is not None:
                _measure_model(rec, model, kind, size, s, device)
                del model
                free_memory(device)
    if is_h100(device):
        _add_anchors(rec.rows)
    else:
        rec.notes.append("official figures (ANCHORS.md) are attached only on an H100")
    return rec.payload()


def _measure_model(rec: Record, model, kind: str, size: str, s: dict, device) -> None:
    copy = s["copy_gbs"]
    info = {"model": kind, "size": size, "params_m": n_params(model) / 1e6,
            "floor_ms": weight_bytes(model) / (copy * 1e9) * 1e3 if copy else None}
    if s["forward_shape"]:
        row = rec.attempt(f"{kind} {size} forward", lambda: _forward_row(model, kind, info, s, device))
        if row is not None:
            rec.rows.append(row)
    for batch in s["batches"]:
        for prompt in s["prompts"]:
            _decode_with_fallback(rec, model, kind, info, batch, prompt, s, device)


def _vocab(model) -> int:
    return model.config.vocab_size


def _forward_row(model, kind, info, s, device) -> dict:
    b, l = parse_shape(s["forward_shape"])
    ids = torch.randint(0, _vocab(model), (b, l), device=device)
    with torch.inference_mode():
        if kind == "Transformer":
            ms, times = forward_ms(lambda: model(ids, use_cache=False).logits, device, s["repeats"])
        else:
            ms, times = forward_ms(lambda: model(ids).logits, device, s["repeats"])
    log(f"[generate] {kind} {info['size']} forward {b}x{l}: {ms:.2f} ms")
    return {**info, "measure": f"forward {b}x{l}", "forward_ms": ms, "times_ms": times}


def _decode_with_fallback(rec: Record, model, kind, info, batch, prompt, s, device) -> None:
    """Time decoding; if mambakit's CUDA-graph decoding fails, record why and time it without graphs."""
    label = f"{kind} {info['size']} b{batch} prompt {prompt}"
    cg = s["cg"] and kind != "Transformer" and device.type == "cuda"
    row = rec.attempt(label, lambda: _decode_row(model, kind, info, batch, prompt, s, device, cg))
    if row is None and cg:
        row = rec.attempt(f"{label} without CUDA graphs",
                          lambda: _decode_row(model, kind, info, batch, prompt, s, device, False))
    if row is not None:
        rec.rows.append(row)


def _decode_row(model, kind, info, batch, prompt, s, device, cg: bool) -> dict:
    ids = torch.randint(0, _vocab(model), (batch, prompt), device=device)
    if kind == "Transformer":
        maker = lambda n: hf_generate_fn(model, ids, n)  # noqa: E731
    else:
        maker = lambda n: mambakit_generate_fn(model, ids, n, cg=cg)  # noqa: E731
    stats = time_decode({kind: maker}, prompt, s["new_tokens"], batch, device, s["repeats"])[kind]
    stats.pop("sequences")
    row = {**info, "measure": "decode", "batch": batch, "prompt": prompt, "cuda_graphs": cg, **stats}
    log(f"[generate] {kind} {info['size']} b{batch} prompt {prompt}: {row['decode_ms_per_token']:.3f} ms/token, "
        f"prefill {row['prefill_ms']:.1f} ms")
    return row


def _add_anchors(rows: list[dict]) -> None:
    for row in rows:
        ref = ANCHOR.get((row["model"], row["size"]), {})
        if row["measure"].startswith("forward"):
            row["official"] = ref.get("forward_b8x2048") if row["measure"] == "forward 8x2048" else None
        elif row["batch"] == 1:
            row["official"] = ref.get("decode_b1")
        elif row["batch"] == 64 and row["prompt"] == 2048:
            row["official_tok_s"] = ref.get("tok_s_b64")
            row["official_prefill_ms"] = ref.get("prefill_b64x2048")


def text(payload: dict) -> str:
    rows = payload["results"]
    dec = [r for r in rows if r["measure"] == "decode"]
    fwd = [r for r in rows if r["measure"] != "decode"]
    title = f"generate on {payload['env']['device']}, {payload['settings']['dtype']}"
    cols = [("model", "model", ""), ("size", "size", ""), ("batch", "batch", "d"), ("prompt", "prompt", "d"),
            ("ms/token", "decode_ms_per_token", ".3f"), ("tokens/s", "tokens_per_s", ",.0f"),
            ("prefill ms", "prefill_ms", ".1f"), ("peak GB", "peak_gb", ".2f"), ("floor ms", "floor_ms", ".3f"),
            ("official", lambda r: r.get("official") or r.get("official_tok_s"), ",.4g")]
    out = report.table(dec, cols, title)
    if fwd:
        out += "\n\n" + report.table(fwd, [("model", "model", ""), ("size", "size", ""), ("measure", "measure", ""),
                                           ("ms", "forward_ms", ".2f"), ("official ms", "official", ".4g"),
                                           ("params M", "params_m", ".0f")])
    return out


def plots(payload: dict, out_dir: str, name: str) -> list[str]:
    dec = [r for r in payload["results"] if r["measure"] == "decode"]
    if not dec:
        return []
    labels = sorted({f"{r['size']} b{r['batch']} p{r['prompt']}" for r in dec})
    kinds = sorted({r["model"] for r in dec})
    by = {(r["model"], f"{r['size']} b{r['batch']} p{r['prompt']}"): r.get("tokens_per_s") for r in dec}
    path = report.bar_plot(os.path.join(out_dir, f"{name}.png"), labels,
                           {k: [by.get((k, lab)) for lab in labels] for k in kinds}, "decode tokens/s",
                           f"generation, {payload['settings']['dtype']}: {payload['env']['device']}")
    return [path] if path else []
