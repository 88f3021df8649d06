"""GPU check of generation: correctness of CUDA-graph decoding, then decode / prefill speed.

    python scripts/gpu_check_generate.py --out $OUT

Random-weight fp16 models built directly on the GPU (speed does not depend on the weights' values):
Mamba-1 and Mamba-2 at the 130m shape (d_model 768, 24 layers, vocab 50277), then the 2.8b shapes
(d_model 2560, 64 layers) if the time budget allows. Measures, as in the project's ANCHORS.md:

- decode ms/token at batch 1 = (time to generate 129 tokens - time to generate 1) / 128, cg=True and cg=False;
- batch 64 after 2048-token prompts: decode tokens/s = 64 * 128 / (t(129) - t(1)), and the prefill time t(1);
- kernels launched by one eager decode step (torch.profiler), per layer;
- a 1M-token prompt prefilled in chunks (Mamba-2 130m): time and peak memory;
- the fused decode step (mambakit.ops.decode) against the unfused one: logits, b1/b8 ms per token, kernels per
  layer, the slowest kernels of a step, and GEMV launch variants (GEMV_CONFIG).
Checks first that graph decoding gives the eager decode's logits and that decoding matches a full forward.
Prints a table last; writes JSON to --out (a directory, or a .json path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import mambakit.ops.decode as fused_decode
from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.inference.cuda_graph import clear_graph_cache
from mambakit.inference.generate import generate

VOCAB = 50277
SHAPES = {
    "mamba1-130m": dict(d_model=768, n_layer=24, ssm_cfg={}),
    "mamba2-130m": dict(d_model=768, n_layer=24, ssm_cfg={"layer": "Mamba2"}),
    "mamba1-2.8b": dict(d_model=2560, n_layer=64, ssm_cfg={}),
    "mamba2-2.7b": dict(d_model=2560, n_layer=64, ssm_cfg={"layer": "Mamba2"}),
}
SMOKE = dict(d_model=32, n_layer=2, ssm_cfg={"d_state": 8})  # --smoke: a CPU dry run of this script
DEVICE = "cuda"
GOALS = {"mamba1-130m": 0.40, "mamba2-130m": 0.40, "mamba1-2.8b": 2.4, "mamba2-2.7b": 2.4}  # ms/token, b1 cg
PEER = {"mamba1-130m": 0.787, "mamba2-130m": 0.649, "mamba1-2.8b": 3.77, "mamba2-2.7b": 3.63}


def build(name: str) -> MambaLMHeadModel:
    torch.manual_seed(0)
    shape = SHAPES[name] if DEVICE == "cuda" else dict(SMOKE, ssm_cfg={**SMOKE["ssm_cfg"], **SHAPES[name]["ssm_cfg"]})
    config = MambaConfig(vocab_size=VOCAB, pad_vocab_size_multiple=16, **shape)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    return MambaLMHeadModel(config, device=DEVICE, dtype=dtype).eval()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int = 3) -> float:
    """Median wall seconds of fn() with the GPU synchronised before and after."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(model, prompt_len: int = 64, new: int = 32) -> dict:
    """cg decode logits vs eager decode logits (same forced tokens); eager decode vs one full forward."""
    prompt = torch.randint(0, VOCAB, (2, prompt_len), device=DEVICE)
    kw = dict(max_new_tokens=new, output_scores=True, return_dict_in_generate=True)
    eager = generate(model, prompt, cg=False, **kw)
    graphed = generate(model, prompt, cg=True, teacher_outputs=eager.sequences, **kw)
    cg_err = max(rel(a, b) for a, b in zip(graphed.scores, eager.scores))
    with torch.inference_mode():
        full = model(eager.sequences).logits[:, prompt_len - 1:-1, :VOCAB]
    dec_err = rel(torch.stack(eager.scores, 1), full)
    tokens_equal = bool(torch.equal(graphed.sequences, eager.sequences))
    return {"cg_vs_eager_rel_err": cg_err, "decode_vs_forward_rel_err": dec_err, "cg_tokens_equal": tokens_equal}


def decode_ms(model, batch: int, prompt_len: int, cg: bool, repeats: int = 3) -> tuple[float, float]:
    """(ms per decoded token, seconds to generate 1 token = prefill) at this batch and prompt length."""
    prompt = torch.randint(0, VOCAB, (batch, prompt_len), device=DEVICE)
    run = lambda n: generate(model, prompt, max_new_tokens=n, cg=cg)  # noqa: E731
    run(2)  # warm-up: kernels compiled, graph captured
    t1 = timed(lambda: run(1), repeats)
    t129 = timed(lambda: run(129), repeats)
    return (t129 - t1) / 128 * 1e3, t1


def profiled_step(model) -> list:
    """Profiler events of one eager decode step at batch 1 (CUDA kernels on a GPU, CPU ops in --smoke)."""
    from torch.profiler import ProfilerActivity, profile

    prompt = torch.randint(0, VOCAB, (1, 8), device=DEVICE)
    _, cache = generate(model, prompt, max_new_tokens=1, return_cache=True)
    tok = prompt[:, -1:]
    with torch.inference_mode():
        model.decode_step(tok, cache)
        sync()
        activity = ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            model.decode_step(tok, cache)
            sync()
    return list(prof.events())


def kernels_per_step(model) -> int:
    """CUDA kernels launched by one eager decode step (batch 1); on CPU (--smoke), aten ops."""
    events = profiled_step(model)
    if DEVICE != "cuda":
        return sum(1 for e in events if e.name.startswith("aten::"))
    return sum(1 for e in events if e.device_type.name == "CUDA")


class fused_upto:
    """Context: decode steps take the fused path up to this batch size (0: always the unfused path)."""

    def __init__(self, batch: int):
        self.batch = batch

    def __enter__(self):
        self.saved = fused_decode.MAX_FUSED_BATCH
        fused_decode.MAX_FUSED_BATCH = self.batch

    def __exit__(self, *exc):
        fused_decode.MAX_FUSED_BATCH = self.saved


def unfused():
    return fused_upto(0)


def fused_vs_unfused(model, new: int = 16) -> dict:
    """Logits of the fused and unfused decode steps on the same forced tokens (batch 1, eager)."""
    prompt = torch.randint(0, VOCAB, (1, 32), device=DEVICE)
    kw = dict(max_new_tokens=new, output_scores=True, return_dict_in_generate=True)
    calls, gemv = [], fused_decode._gemv
    fused_decode._gemv = lambda *a, **k: calls.append(1) or gemv(*a, **k)  # proves the fused path ran
    try:
        with unfused():
            ref = generate(model, prompt, cg=False, **kw)
        unfused_calls = len(calls)
        out = generate(model, prompt, cg=False, teacher_outputs=ref.sequences, **kw)
    finally:
        fused_decode._gemv = gemv
    return {"fused_vs_unfused_rel_err": max(rel(a, b) for a, b in zip(out.scores, ref.scores)),
            "fused_gemv_launches": len(calls) - unfused_calls, "unfused_gemv_launches": unfused_calls}


def kernel_profile(model, top: int = 8) -> list:
    """The kernels of one eager batch-1 decode step with the most GPU time: (name, calls, total us)."""
    if DEVICE != "cuda":
        return []
    agg = {}
    for e in profiled_step(model):
        if e.device_type.name == "CUDA":
            n, t = agg.get(e.name[:60], (0, 0.0))
            agg[e.name[:60]] = (n + 1, t + e.device_time)
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]
    return [(k, n, round(t, 1)) for k, (n, t) in rows]


B1_REPEATS = 3  # --b1-repeats
SMALL_BATCHES = (2, 4)  # --small-batches: fused vs unfused at these batch sizes
N_VARIANTS = None  # --variants: how many of GEMV_VARIANTS to time
# GEMV_CONFIG overrides (update_tile: UPDATE_TILE; max_fused_weight: MAX_FUSED_WEIGHT, to fuse the big layers)
# early_state: the state updates load the state before their grid-dependency wait (decode.EARLY_STATE; off by
# default, measured in gpu_run9/call4)
GEMV_VARIANTS = [dict(early_state=True), {}, dict(early_state=True), {}, dict(early_state=True), {}]
# 2.7b/2.8b (the default since gpu_run9 fuses every layer, with split tiles): {} repeats the default (a fresh
# capture), which shows the capture-to-capture spread; loop_min_k None: no loop kernel for the long-K GEMVs
LARGE_VARIANTS = [{}, dict(loop_min_k=None), dict(early_state=True), {}, dict(loop_min_k=None),
                  dict(early_state=True), {}]
# (call4, early_state True as the default then: 2.7b {} 1.954 / 1.992 / 1.939, loop_min_k None 2.034 / 2.051,
# early_state False 1.999 / 2.032; 2.8b 1.924 / 2.081 / 1.868, 2.040 / 1.893, 1.940 / 1.847)
# (gpu_run9/call2: {} 1.978 / 2.092 / 1.904 / 2.087 ms/token at 2.7b, split False 2.587, the former
# fused_out plan 2.411, unfused 2.670; Mamba-1 2.8b {} 1.87-2.08, split False 2.341. call3: loop everywhere
# 2.026 / 2.143 (2.7b), 2.023 / 2.008 (2.8b) against {} 1.97-2.08 / 1.72-2.03; loop_min_k None is call2's {})


class config:
    """Context: a GEMV variant (see GEMV_VARIANTS) applied to mambakit.ops.decode."""

    def __init__(self, variant: dict):
        self.variant = variant

    def __enter__(self):
        self.saved = (dict(fused_decode.GEMV_CONFIG), fused_decode.UPDATE_TILE, fused_decode.MAX_FUSED_WEIGHT,
                      fused_decode.LARGE_MAMBA2_STEP, fused_decode.EARLY_STATE)
        v = self.variant
        fused_decode.GEMV_CONFIG.update({k: x for k, x in v.items() if k in fused_decode.GEMV_CONFIG})
        fused_decode.UPDATE_TILE = v.get("update_tile", fused_decode.UPDATE_TILE)
        fused_decode.MAX_FUSED_WEIGHT = v.get("max_fused_weight", fused_decode.MAX_FUSED_WEIGHT)
        fused_decode.LARGE_MAMBA2_STEP = v.get("large_step", fused_decode.LARGE_MAMBA2_STEP)
        fused_decode.EARLY_STATE = v.get("early_state", fused_decode.EARLY_STATE)

    def __exit__(self, *exc):
        (base, fused_decode.UPDATE_TILE, fused_decode.MAX_FUSED_WEIGHT, fused_decode.LARGE_MAMBA2_STEP,
         fused_decode.EARLY_STATE) = self.saved
        fused_decode.GEMV_CONFIG.clear()
        fused_decode.GEMV_CONFIG.update(base)


def gemv_variants(model, r: dict, deadline: float, variants: list) -> None:
    """b1 cg ms/token for each GEMV launch variant (the graph is captured again for each); a variant that
    fuses layers the default leaves unfused is also checked against the unfused logits."""
    for v in variants[:N_VARIANTS]:
        if time.perf_counter() > deadline:
            break
        clear_graph_cache(model)
        with config(v):
            key = "large_fused_out" if v.get("large_step") == "fused_out" else None
            if key and key not in r:
                r[key] = dict(fused_vs_unfused(model), kernels=kernel_profile(model))
                print(f"  {key}: {r[key]}", flush=True)
            ms, _ = decode_ms(model, 1, 16, True, repeats=B1_REPEATS)
        r.setdefault("gemv_variants", {}).setdefault(str(v), []).append(ms)
        print(f"  gemv {v}: {ms:.3f} ms/token", flush=True)
    clear_graph_cache(model)


def long_prompt(model, length: int = 1 << 20, chunk: int = 1 << 16) -> dict:
    """A 1M-token prompt, prefilled in chunks, then 8 tokens: seconds and peak GPU memory."""
    if DEVICE != "cuda":
        length, chunk = 2048, 256
    else:
        torch.cuda.reset_peak_memory_stats()
    prompt = torch.randint(0, VOCAB, (1, length), device=DEVICE)
    t = timed(lambda: generate(model, prompt, max_new_tokens=8, prefill_chunk_size=chunk, cg=True), repeats=1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    return {"tokens": length, "chunk": chunk, "seconds": t, "peak_gib": peak}


def run_model(name: str, results: dict, big_batch: bool, deadline: float) -> None:
    t0 = time.perf_counter()
    model = build(name)
    r = results.setdefault(name, {})
    r["check"] = check(model)
    print(f"[{name}] check {r['check']}", flush=True)
    r["check"].update(fused_vs_unfused(model))
    print(f"[{name}] check {r['check']}", flush=True)
    r["kernels_per_decode_step"] = kernels_per_step(model)
    r["kernels_per_layer"] = r["kernels_per_decode_step"] / model.config.n_layer
    with unfused():
        r["unfused_kernels_per_layer"] = kernels_per_step(model) / model.config.n_layer
    r["top_kernels_fused"] = kernel_profile(model)
    with unfused():
        r["top_kernels_unfused"] = kernel_profile(model)
    for k in ("top_kernels_fused", "top_kernels_unfused"):
        print(f"[{name}] {k}: {r[k]}", flush=True)
    for cg in (True, False):
        ms, _ = decode_ms(model, 1, 16, cg, repeats=B1_REPEATS if cg else 3)
        r[f"b1_ms_per_token_cg={cg}"] = ms
        print(f"[{name}] b1 cg={cg}: {ms:.3f} ms/token", flush=True)
    clear_graph_cache(model)
    with unfused():
        r["unfused_b1_ms_per_token_cg=True"], _ = decode_ms(model, 1, 16, True)
    clear_graph_cache(model)
    print(f"[{name}] unfused b1 cg: {r['unfused_b1_ms_per_token_cg=True']:.3f} ms/token", flush=True)
    for batch in SMALL_BATCHES if model.config.d_model < 2048 else ():
        with fused_upto(batch):
            r[f"b{batch}_ms_per_token_cg=True"], _ = decode_ms(model, batch, 16, True)
        clear_graph_cache(model)
        with unfused():
            r[f"unfused_b{batch}_ms_per_token_cg=True"], _ = decode_ms(model, batch, 16, True)
        clear_graph_cache(model)
        print(f"[{name}] b{batch} cg fused {r[f'b{batch}_ms_per_token_cg=True']:.3f} "
              f"unfused {r[f'unfused_b{batch}_ms_per_token_cg=True']:.3f} ms/token", flush=True)
    gemv_variants(model, r, deadline, GEMV_VARIANTS if model.config.d_model < 2048 else LARGE_VARIANTS)
    if big_batch and time.perf_counter() < deadline:
        batch, length = (64, 2048) if DEVICE == "cuda" else (4, 64)
        ms, prefill = decode_ms(model, batch, length, True, repeats=2)
        r["b64_after_2048_tok_per_s"] = batch / ms * 1e3
        r["prefill_b64x2048_ms"] = prefill * 1e3
        print(f"[{name}] b64: {r['b64_after_2048_tok_per_s']:.0f} tok/s, prefill {prefill * 1e3:.1f} ms", flush=True)
    if name == "mamba2-130m" and time.perf_counter() < deadline:
        r["long_prompt"] = long_prompt(model)
        print(f"[{name}] long prompt {r['long_prompt']}", flush=True)
    r["seconds"] = time.perf_counter() - t0
    clear_graph_cache(model)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def table(results: dict) -> str:
    head = (f"{'model':<13} {'b1 cg ms/tok':>12} {'unfused':>8} {'goal':>5} {'peer':>6} {'b1 eager':>9} "
            f"{'b4 fused':>8} {'unfused':>8} {'b64 tok/s':>10} {'prefill ms':>10} {'kern/layer':>10} {'unfused':>8} "
            f"{'cg err':>8} {'fused err':>9}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if not isinstance(r, dict) or "check" not in r:
            continue
        f = lambda k, fmt: format(r[k], fmt) if k in r else "-".rjust(int(fmt.split(".")[0]))  # noqa: E731
        lines.append(f"{name:<13} {f('b1_ms_per_token_cg=True', '12.3f')} {f('unfused_b1_ms_per_token_cg=True', '8.3f')} "
                     f"{GOALS[name]:>5.2f} {PEER[name]:>6.3f} {f('b1_ms_per_token_cg=False', '9.3f')} "
                     f"{f('b4_ms_per_token_cg=True', '8.3f')} {f('unfused_b4_ms_per_token_cg=True', '8.3f')} "
                     f"{f('b64_after_2048_tok_per_s', '10.0f')} "
                     f"{f('prefill_b64x2048_ms', '10.1f')} {f('kernels_per_layer', '10.1f')} "
                     f"{f('unfused_kernels_per_layer', '8.1f')} {r['check']['cg_vs_eager_rel_err']:8.1e} "
                     f"{r['check'].get('fused_vs_unfused_rel_err', float('nan')):9.1e}")
        if r.get("gemv_variants"):
            lines.append("    gemv variants (b1 cg ms/tok, each capture): " + ", ".join(
                f"{k}=" + "/".join(f"{x:.3f}" for x in v) for k, v in r["gemv_variants"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory (or .json file) for the results")
    p.add_argument("--budget", type=float, default=220.0, help="seconds; later stages are skipped past it")
    p.add_argument("--skip-large", action="store_true", help="do not run the 2.8b shapes")
    p.add_argument("--smoke", action="store_true", help="dry run on CPU with tiny shapes (checks the script only)")
    p.add_argument("--variants", type=int, default=None, help="time only the first N GEMV variants")
    p.add_argument("--small-batches", default="2,4", help="batch sizes timed fused vs unfused (comma list)")
    p.add_argument("--only", default=None, help="comma list of model names to run (default: all four)")
    p.add_argument("--large-big-batch", action="store_true",
                   help="also time batch 64 after 2048-token prompts on the 2.8b / 2.7b shapes")
    p.add_argument("--b1-repeats", type=int, default=3, help="repeats of the b1 decode timing (median)")
    args = p.parse_args(argv)
    global DEVICE, N_VARIANTS, SMALL_BATCHES, B1_REPEATS
    B1_REPEATS = args.b1_repeats
    N_VARIANTS = args.variants
    SMALL_BATCHES = tuple(int(b) for b in args.small_batches.split(",") if b)
    if args.smoke:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke for a CPU dry run)", file=sys.stderr)
        return 1
    start = time.perf_counter()
    deadline = start + args.budget
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run, tiny shapes)"
    results = {"device": device_name, "torch": torch.__version__}
    only = set(args.only.split(",")) if args.only else None
    for name in ("mamba1-130m", "mamba2-130m"):
        if only is None or name in only:
            run_model(name, results, big_batch=True, deadline=deadline)
    for name in ("mamba1-2.8b", "mamba2-2.7b"):
        if only is not None and name not in only:
            continue
        if args.skip_large or time.perf_counter() > start + 0.6 * args.budget:
            results[name] = "skipped (time budget)"
            continue
        run_model(name, results, big_batch=args.large_big_batch, deadline=deadline)
    results["wall_seconds"] = time.perf_counter() - start
    out = args.out if args.out.endswith(".json") else os.path.join(args.out, "gpu_check_generate.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
