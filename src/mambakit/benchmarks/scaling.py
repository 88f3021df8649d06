"""`mambakit bench scaling`: how time and memory grow with sequence length, Mamba against a Transformer.

- Forward (prefill) time and peak memory for lengths min-len .. max-len (x factor each step, 1K to 1M by
  default), batch 1, up to the last token's logits. Mamba runs sequences longer than --prefill-chunk as chunks
  with the state carried through ``InferenceParams`` (seqlen_offset > 0), so a 1M-token prompt fits; at
  lengths up to --single-pass-max it also runs the whole sequence in one pass and records how far the two
  results differ. The same-size Pythia Transformer runs until it runs out of memory or --transformer-max-len.
- Decode memory against context length: Mamba's inference state (measured: the cache tensors it allocates)
  is constant; the Transformer's KV cache is 2 x layers x hidden x context x bytes per element.
"""

from __future__ import annotations

import argparse
import os

import torch

from ..cache import InferenceParams
from . import report
from .common import (Record, dtype_of, free_memory, log, median, parse_list, peak_gb, pick_device, reset_peak,
                     wall_ms)
from .models import (MAMBA_VOCAB, PYTHIA_SIZES, PYTHIA_VOCAB, build_mamba, layer_name, mamba_sized, pythia,
                     weight_bytes)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="130m", help="model size (Mamba and the Pythia-shaped Transformer)")
    p.add_argument("--layers", default="mamba1,mamba2", help="Mamba mixers: mamba1, mamba2")
    p.add_argument("--no-transformer", action="store_true", help="skip the Transformer")
    p.add_argument("--min-len", type=int, default=1024, help="shortest sequence (default 1024)")
    p.add_argument("--max-len", type=int, default=None, help="longest sequence (default 1048576 on CUDA, 8192 on CPU)")
    p.add_argument("--factor", type=int, default=4, help="length multiplier between points (2 or 4)")
    p.add_argument("--transformer-max-len", type=int, default=65536, help="longest sequence tried on the Transformer")
    p.add_argument("--prefill-chunk", type=int, default=131072,
                   help="Mamba sequences longer than this run in chunks of this size with the state carried")
    p.add_argument("--single-pass-max", type=int, default=262144,
                   help="up to this length a chunked run is also done in one pass and the two compared")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per length (median), after one warm-up")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32 (default on CPU)")


def lengths(lo: int, hi: int, factor: int) -> list[int]:
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= factor
    return out


def settings_of(args, device) -> dict:
    small = bool(args.small)
    max_len = 512 if small else args.max_len or (1 << 20 if device.type == "cuda" else 8192)
    return {"size": "tiny" if small else args.size, "layers": [layer_name(x) for x in parse_list(args.layers)],
            "transformer": not args.no_transformer, "lengths": lengths(64 if small else args.min_len, max_len,
                                                                       args.factor),
            "transformer_max_len": 256 if small else args.transformer_max_len,
            "prefill_chunk": 128 if small else args.prefill_chunk,
            "single_pass_max": 512 if small else args.single_pass_max, "repeats": 1 if small else args.repeats,
            "dtype": args.dtype or ("bfloat16" if device.type == "cuda" else "float32"), "batch": 1, "small": small,
            "vocab_size": 1024 if small else None}  # None: the real vocabularies (Mamba 50277, Pythia 50304)


def mamba_prefill(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Last-token logits (batch, vocab) of ids (batch, l), in chunks of ``chunk`` tokens with the state carried."""
    if ids.shape[1] <= chunk:
        return model(ids, num_last_tokens=1).logits[:, -1]
    params = InferenceParams(max_seqlen=ids.shape[1], max_batch_size=ids.shape[0])
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start:start + chunk]
        logits = model(piece, inference_params=params, num_last_tokens=1).logits[:, -1]
        params.seqlen_offset += piece.shape[1]
    return logits


def state_bytes(model) -> int:
    """Bytes of Mamba's decoding state for one sequence (every layer's conv window and SSM state)."""
    cache = model.allocate_inference_cache(1, 1)
    return sum(t.numel() * t.element_size() for states in cache.values() for t in states)


def kv_bytes(size: str, context: int, elem_bytes: int) -> int:
    """A Pythia-shaped Transformer's KV cache for one sequence: keys and values of every layer."""
    hidden, layers, _, _ = PYTHIA_SIZES[size]
    return 2 * layers * hidden * context * elem_bytes


def _timed(fn, device, repeats: int, own_bytes: int) -> dict:
    """Median time after a warm-up, and the peak memory this model alone needs: the peak minus what was
    allocated before the call (other models' weights included), plus this model's weights."""
    fn()  # warm-up: kernel compilation and autotuning at this length
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    reset_peak(device)
    times = [wall_ms(fn, device) for _ in range(repeats)]
    peak = peak_gb(device)
    return {"ms": median(times), "times_ms": times,
            "peak_gb": None if peak is None else peak - before / 1e9 + own_bytes / 1e9}


def build_models(rec: Record, s: dict, device, dtype, seed: int) -> dict:
    """name -> model: the Mamba models, then the Transformer; all small enough (130m) to stay resident."""
    models = {}
    for layer in s["layers"]:
        torch.manual_seed(seed)
        config = mamba_sized(layer, s["size"], vocab_size=s["vocab_size"] or MAMBA_VOCAB)
        model = rec.attempt(f"{layer} build", lambda: build_mamba(config, device, dtype))
        if model is not None:
            models[layer] = model
            rec.rows.append({"model": layer, "measure": "decode_state", "state_bytes": state_bytes(model)})
    if s["transformer"]:
        model = rec.attempt("Transformer build", lambda: pythia(
            s["size"], device, dtype, max_positions=s["transformer_max_len"] + 8,
            vocab_size=s["vocab_size"] or PYTHIA_VOCAB))
        if model is not None:
            models["Transformer"] = model
        elem = torch.empty((), dtype=dtype).element_size()
        rec.rows += [{"model": "Transformer", "measure": "kv_cache", "context": n,
                      "kv_bytes": kv_bytes(s["size"], n, elem)} for n in s["lengths"]]
    return models


def run(args) -> dict:
    device = pick_device(args.device)
    s = settings_of(args, device)
    rec = Record("scaling", device, s)
    models = build_models(rec, s, device, dtype_of(s["dtype"]), args.seed)
    # Length by length, every model in turn, so that a run cut short by a time limit is still a comparison.
    for n in s["lengths"]:
        for name in list(models):
            ok = _measure(rec, models[name], name, n, s, device)
            if not ok and name == "Transformer":  # out of memory: longer sequences will not fit either
                del models[name]
                free_memory(device)
    rec.notes.append("Transformer KV bytes are computed (2 x layers x hidden x context x element size); Mamba's "
                     "state bytes are the tensors its cache allocates, the same at every context length")
    rec.notes.append("peak GB = the peak while this model ran, less the other resident models, plus its weights")
    return rec.payload()


def _measure(rec: Record, model, name: str, n: int, s: dict, device) -> bool:
    """One forward at length n (False when it failed, e.g. out of memory)."""
    transformer = name == "Transformer"
    if transformer and n > s["transformer_max_len"]:
        return True
    ids = torch.randint(0, model.config.vocab_size, (s["batch"], n), device=device)
    chunk = s["prefill_chunk"]
    if transformer:
        fn = lambda: model(ids, use_cache=False, logits_to_keep=1).logits  # noqa: E731
    else:
        fn = lambda: mamba_prefill(model, ids, chunk)  # noqa: E731
    with torch.inference_mode():
        res = rec.attempt(f"{name} forward {n}", lambda: _timed(fn, device, s["repeats"], weight_bytes(model)))
        if res is None:
            rec.rows.append({"model": name, "measure": "forward", "length": n, "ms": None,
                             "error": rec.errors[-1]["error"][:300]})
            return False
        row = {"model": name, "measure": "forward", "length": n, **res}
        if not transformer:
            row["chunked"] = n > chunk
            if chunk < n <= s["single_pass_max"]:
                rec.attempt(f"{name} single pass {n}", lambda: row.update(_single_pass(model, ids, chunk, device)))
    rec.rows.append(row)
    log(f"[scaling] {name} {n}: {row['ms']:.1f} ms, peak {report.fmt(row['peak_gb'], '.2f')} GB")
    return True


def _single_pass(model, ids, chunk, device) -> dict:
    """One-pass time and the relative difference of its last logits from the chunked run's."""
    chunked = mamba_prefill(model, ids, chunk).float()
    one = mamba_prefill(model, ids, ids.shape[1]).float()  # also the warm-up
    ms = wall_ms(lambda: mamba_prefill(model, ids, ids.shape[1]), device)
    return {"single_pass_ms": ms, "chunked_vs_single_rel_err": float((chunked - one).norm() / one.norm())}


def text(payload: dict) -> str:
    rows = payload["results"]
    fwd = [r for r in rows if r["measure"] == "forward"]
    cols = [("model", "model", ""), ("length", "length", ",d"), ("ms", "ms", ".1f"), ("peak GB", "peak_gb", ".2f"),
            ("chunked", "chunked", ""), ("1-pass ms", "single_pass_ms", ".1f"),
            ("chunk vs 1-pass", "chunked_vs_single_rel_err", ".1e"), ("error", "error", "")]
    out = report.table(fwd, cols, f"scaling on {payload['env']['device']}, {payload['settings']['dtype']}, batch 1")
    mem = {r["model"]: r["state_bytes"] for r in rows if r["measure"] == "decode_state"}
    kv = [r for r in rows if r["measure"] == "kv_cache"]
    if mem or kv:
        lines = [f"decode state per sequence: " + ", ".join(f"{k} {v / 2**20:.2f} MiB (any context)"
                                                            for k, v in mem.items())]
        lines += [f"  Transformer KV cache at {r['context']:,} tokens: {r['kv_bytes'] / 2**20:,.1f} MiB" for r in kv]
        out += "\n" + "\n".join(lines)
    return out


def plots(payload: dict, out_dir: str, name: str) -> list[str]:
    rows = payload["results"]
    fwd = [r for r in rows if r["measure"] == "forward"]
    models = sorted({r["model"] for r in fwd})

    def series(key):
        return {m: ([r["length"] for r in fwd if r["model"] == m], [r.get(key) for r in fwd if r["model"] == m])
                for m in models}

    dev = payload["env"]["device"]
    paths = [report.loglog_plot(os.path.join(out_dir, f"{name}_time.png"), series("ms"), "sequence length",
                                "forward ms (batch 1)", f"forward time vs length: {dev}")]
    if any(r.get("peak_gb") for r in fwd):
        paths.append(report.loglog_plot(os.path.join(out_dir, f"{name}_memory.png"), series("peak_gb"),
                                        "sequence length", "peak GB", f"forward peak memory vs length: {dev}"))
    kv = [r for r in rows if r["measure"] == "kv_cache"]
    state = {r["model"]: r["state_bytes"] for r in rows if r["measure"] == "decode_state"}
    if kv or state:
        xs = [r["context"] for r in kv] or payload["settings"]["lengths"]
        mem = {f"{m} state": (xs, [b / 2**20] * len(xs)) for m, b in state.items()}
        if kv:
            mem["Transformer KV cache"] = (xs, [r["kv_bytes"] / 2**20 for r in kv])
        paths.append(report.loglog_plot(os.path.join(out_dir, f"{name}_decode_memory.png"), mem, "context length",
                                        "MiB per sequence", "decode memory vs context"))
    return [p for p in paths if p]
