"""Timed generation for mambakit and transformers models: greedy, a fixed number of new tokens, no early stop.

Decode time per token follows ANCHORS.md: (t(n new tokens) - t(1 new token)) / (n - 1), which removes the
prefill; t(1) is reported as the prefill time (prompt forward + first token).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from .common import interleaved_ms, median, peak_gb, reset_peak, wall_ms


def mambakit_generate_fn(model, input_ids: torch.Tensor, n_new: int, cg: bool = True) -> Callable[[], torch.Tensor]:
    """A closure running ``model.generate`` greedily for exactly n_new tokens, with the keywords it accepts.

    Generation is written separately (mambakit.inference.generate); keywords it does not take yet are left out.
    """
    try:
        from ..inference.generate import generate
    except ImportError as err:
        raise RuntimeError(f"mambakit.inference.generate is not available ({err})") from None
    params = inspect.signature(generate).parameters
    kwargs: dict = {}
    if "max_new_tokens" in params:
        kwargs["max_new_tokens"] = n_new
    else:
        kwargs["max_length"] = input_ids.shape[1] + n_new
    optional = {"top_k": 1, "eos_token_id": None, "cg": cg and input_ids.is_cuda}
    kwargs.update({k: v for k, v in optional.items() if k in params})
    return lambda: model.generate(input_ids, **kwargs)


def hf_generate_fn(model, input_ids: torch.Tensor, n_new: int) -> Callable[[], torch.Tensor]:
    """transformers' generate: greedy, KV/state cache on, exactly n_new tokens (min_new_tokens blocks EOS)."""
    mask = torch.ones_like(input_ids)
    return lambda: model.generate(input_ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=False, use_cache=True, pad_token_id=0)


def sequences(out) -> torch.Tensor:
    """Token ids (batch, prompt + new) from a generate output (a tensor or an object with .sequences)."""
    return out.sequences if hasattr(out, "sequences") else out


def checked(fn: Callable[[], object], prompt_len: int, n_new: int, label: str) -> torch.Tensor:
    """Run fn once (it also serves as the warm-up) and check that it made exactly n_new tokens."""
    seq = sequences(fn())
    if seq.shape[-1] != prompt_len + n_new:
        raise RuntimeError(f"{label}: generate returned {seq.shape[-1] - prompt_len} new tokens, asked for {n_new}")
    return seq


def decode_stats(t1: list[float], tn: list[float], n_new: int, batch: int) -> dict:
    """Prefill and per-token decode figures from the times of 1 and n_new new tokens (ms)."""
    m1, mn = median(t1), median(tn)
    per_tok = (mn - m1) / (n_new - 1) if n_new > 1 else None
    return {"prefill_ms": m1, "total_ms": mn, "decode_ms_per_token": per_tok,
            "tokens_per_s": batch * 1e3 / per_tok if per_tok and per_tok > 0 else None,
            "t1_ms_all": t1, "tn_ms_all": tn}


def time_decode(makers: dict[str, Callable[[int], Callable]], prompt_len: int, n_new: int, batch: int,
                device: torch.device, repeats: int) -> dict[str, dict]:
    """Decode figures of several generators, timed in turn (interleaved) for 1 and n_new tokens.

    makers: name -> (n -> closure generating n tokens). Also returns each one's output of the n_new run
    (key 'sequences') and the peak memory of that run.
    """
    out: dict[str, dict] = {k: {} for k in makers}
    runs = {}
    for n in (1, n_new):
        fns = {name: make(n) for name, make in makers.items()}
        for name, fn in fns.items():  # warm-up: CUDA-graph capture, autotuning, allocator
            reset_peak(device)
            seq = checked(fn, prompt_len, n, name)
            if n == n_new:
                out[name]["sequences"] = seq
                out[name]["peak_gb"] = peak_gb(device)
        runs[n] = interleaved_ms(fns, device, repeats, warmup=0)
    for name in makers:
        out[name].update(decode_stats(runs[1][name], runs[n_new][name], n_new, batch))
    return out


def forward_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, list[float]]:
    fn()
    times = [wall_ms(fn, device) for _ in range(repeats)]
    return median(times), times
