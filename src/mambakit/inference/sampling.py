"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The function names are those of the official ``mamba_ssm.utils.generation`` (``sample``,
``modify_logits_for_top_p_filtering``, ``modify_logit_for_repetition_penalty`` ...), with these fixes:

- min-p keeps the tokens whose probability is at least ``min_p`` times the probability of the *most likely*
  token (the official reads the logit of token 0 instead, and calls ``.item()`` on it, which fails for
  batch > 1);
- every filter works row by row on a (batch, vocab) tensor, with no host synchronisation, so sampling can
  run while the GPU is still busy with the previous step;
- sampling draws from an optional ``torch.Generator``, so a seed reproduces a run.

Order of the processing (the order of transformers' logits processors): repetition penalty -> temperature
-> top-k -> top-p -> min-p -> sample. With ``top_k == 1`` (the official default) decoding is greedy and
temperature / top-p / min-p are ignored, as in the official code.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "sample", "validate_sampling_args", "modify_logits_for_top_k_filtering", "modify_logits_for_top_p_filtering",
    "modify_logits_for_min_p_filtering", "modify_logit_for_repetition_penalty", "apply_repetition_penalty",
]


def validate_sampling_args(top_k: int = 1, top_p: float = 0.0, min_p: float = 0.0, temperature: float = 1.0,
                           repetition_penalty: float = 1.0, greedy: bool | None = None) -> None:
    """Raise ValueError naming the argument when a sampling option is out of range.

    greedy: whether decoding is greedy (temperature is only checked when sampling); defaults to top_k == 1.
    """
    greedy = (top_k == 1) if greedy is None else greedy
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = no top-k filter, 1 = greedy), got {top_k!r}")
    for name, v in (("top_p", top_p), ("min_p", min_p)):
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0 or math.isnan(float(v)):
            raise ValueError(f"{name} must be a number in [0, 1] (0 = off), got {v!r}")
    if not isinstance(temperature, (int, float)) or math.isnan(float(temperature)):
        raise ValueError(f"temperature must be a number, got {temperature!r}")
    if not greedy and not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0 and finite when sampling, got {temperature!r}; "
                         "for deterministic output use greedy decoding (top_k=1 or do_sample=False)")
    if not isinstance(repetition_penalty, (int, float)) or not (repetition_penalty > 0
                                                                and math.isfinite(repetition_penalty)):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 = off), got {repetition_penalty!r}")


def modify_logits_for_top_k_filtering(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set to -inf every logit below the row's k-th largest, in place. logits: (batch, vocab). top_k 0 = off.

    Ties at the k-th value are all kept (more than k tokens may survive), as in transformers.
    """
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (batch, 1)
    return logits.masked_fill_(logits < kth, float("-inf"))


def modify_logits_for_top_p_filtering(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter, in place: keep the smallest set of most likely tokens whose probability sums to at
    least ``top_p``; the rest become -inf. logits: (batch, vocab). top_p 0 or 1 = off (official convention).
    """
    if top_p <= 0.0 or top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)  # ascending
    cum = sorted_logits.float().softmax(dim=-1).cumsum(dim=-1)
    # A token goes when all the tokens less likely than it (and itself) hold at most 1 - top_p of the mass;
    # the most likely token always stays.
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill_(remove, float("-inf"))


def modify_logits_for_min_p_filtering(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep the tokens with probability >= ``min_p`` x the row's largest probability, in place.

    p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p), so no softmax is needed.
    logits: (batch, vocab). min_p 0 = off; min_p 1 keeps only the most likely token(s).
    """
    if min_p <= 0.0:
        return logits
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p)  # (batch, 1)
    return logits.masked_fill_(logits < threshold, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty (Keskar et al. 2019, the official semantics) on the tokens marked in ``seen``:
    positive logits are divided by ``penalty``, negative ones multiplied. Returns a new tensor.

    logits: (batch, vocab); seen: (batch, vocab) bool, True for tokens already in the row's sequence.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def modify_logit_for_repetition_penalty(logits: torch.Tensor, prev_output_tokens: torch.Tensor,
                                        repetition_penalty: float = 1.0) -> torch.Tensor:
    """Official signature, in place. logits: (batch, vocab); prev_output_tokens: (batch, seqlen) int.

    Each distinct earlier token is penalised once, however often it occurred.
    """
    if repetition_penalty == 1.0:
        return logits
    score = torch.gather(logits, 1, prev_output_tokens)
    score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
    return logits.scatter_(1, prev_output_tokens, score)


def sample(logits: torch.Tensor, top_k: int = 1, top_p: float = 0.0, min_p: float = 0.0,
           temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row. logits: (batch, vocab) -> tokens (batch,) int64. Does not modify ``logits``.

    top_k == 1 is greedy (argmax). Otherwise the logits are divided by ``temperature``, filtered by top-k
    (0 = off), top-p (0 or 1 = off) and min-p (0 = off), and a token is drawn from the softmax.
    """
    if top_k == 1:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature  # a new tensor: the filters below work in place on it
    modify_logits_for_top_k_filtering(scaled, top_k)
    modify_logits_for_top_p_filtering(scaled, top_p)
    modify_logits_for_min_p_filtering(scaled, min_p)
    return _draw(scaled.softmax(dim=-1), generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row with probability probs[row, i]. probs: (batch, vocab) float -> (batch,) int64.

    argmax_i p_i / E_i with E_i ~ Exp(1) is exactly categorical(p): E_i / p_i ~ Exp(rate p_i) and the smallest
    of independent exponentials is i with probability p_i / sum(p). Unlike torch.multinomial it needs no host
    synchronisation. E is clamped away from 0 so that a filtered token (p = 0) can never win through 0/0.
    """
    device = probs.device if generator is None else generator.device
    # Draw on the generator's device (a CPU generator also drives GPU sampling, reproducibly).
    e = torch.empty(probs.shape, dtype=probs.dtype, device=device).exponential_(1.0, generator=generator)
    e = e.clamp_min_(torch.finfo(probs.dtype).tiny).to(probs.device, non_blocking=True)
    return (probs / e).argmax(dim=-1)
