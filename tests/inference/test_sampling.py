"""Sampling filters checked on fixed logits tables: exact supports and chi-square bounds on the frequencies.

Every draw uses a fixed seed, so these tests are deterministic; the bounds are loose enough (p-value ~1e-5 for a
correct sampler) that any seed passes, and tight enough that a wrong filter or temperature fails by far.
"""
import math

import pytest
import torch

from mambakit.inference.sampling import (apply_repetition_penalty, modify_logit_for_repetition_penalty,
                                         modify_logits_for_min_p_filtering, modify_logits_for_top_k_filtering,
                                         modify_logits_for_top_p_filtering, sample, validate_sampling_args)

P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04], dtype=torch.float64)
PERM = torch.tensor([3, 5, 0, 4, 1, 2])  # row 1 holds the same table shuffled: its best token is not index 0
N = 40_000  # draws per row


def table() -> torch.Tensor:
    """(2, 6) logits: row 0 = log P, row 1 = log P permuted, plus an arbitrary per-row shift."""
    logp = P.log()
    row1 = torch.empty_like(logp)
    row1[PERM] = logp
    return torch.stack([logp + 3.0, row1 - 7.0]).float()


def renorm(p: torch.Tensor, keep) -> torch.Tensor:
    q = torch.zeros_like(p)
    q[list(keep)] = p[list(keep)]
    return q / q.sum()


def tempered(t: float) -> torch.Tensor:
    q = P ** (1.0 / t)
    return q / q.sum()


def draw_counts(**kwargs) -> torch.Tensor:
    """Counts (2, 6) of N draws per row of the table, with row 1 mapped back to P's order."""
    logits = table().repeat_interleave(N, dim=0)  # (2N, 6)
    tokens = sample(logits, generator=torch.Generator().manual_seed(1234), **kwargs).view(2, N)
    counts = torch.stack([torch.bincount(t, minlength=6) for t in tokens]).double()
    counts[1] = counts[1][PERM]
    return counts


def assert_distribution(counts: torch.Tensor, expected: torch.Tensor) -> None:
    for row in counts:
        assert bool((row[expected == 0] == 0).all()), f"filtered tokens were drawn: {row.tolist()}"
        kept = expected > 0
        e = N * expected[kept]
        chi2 = float(((row[kept] - e) ** 2 / e).sum())
        df = int(kept.sum()) - 1
        assert chi2 < 25 + 2 * df, f"chi2 {chi2:.1f} (df {df}): counts {row.tolist()} vs expected {e.tolist()}"


@pytest.mark.parametrize("kwargs, expected", [
    (dict(top_k=0), P),
    (dict(top_k=0, temperature=2.0), tempered(2.0)),
    (dict(top_k=0, temperature=0.5), tempered(0.5)),
    (dict(top_k=3), renorm(P, [0, 1, 2])),
    (dict(top_k=0, top_p=0.7), renorm(P, [0, 1, 2])),  # 0.40 + 0.25 < 0.7 <= 0.40 + 0.25 + 0.15
    (dict(top_k=0, top_p=0.6), renorm(P, [0, 1])),
    (dict(top_k=0, min_p=0.3), renorm(P, [0, 1, 2])),  # p >= 0.3 * 0.40 = 0.12
    (dict(top_k=0, min_p=0.5), renorm(P, [0, 1])),  # p >= 0.20
    (dict(top_k=0, min_p=0.45, temperature=2.0), renorm(tempered(2.0), [0, 1, 2, 3])),  # after temperature
    (dict(top_k=5, top_p=0.9, temperature=1.0), renorm(P, [0, 1, 2, 3])),
])
def test_sampled_frequencies_match_the_filtered_distribution(kwargs, expected):
    assert_distribution(draw_counts(**kwargs), expected)


def test_min_p_is_relative_to_the_best_token_of_each_row():
    # The official reads token 0's logit (and .item() fails for batch > 1); here row 1's best token is index 2.
    logits = table()
    kept = modify_logits_for_min_p_filtering(logits.clone(), 0.5).isfinite()
    assert kept[0].tolist() == [True, True, False, False, False, False]
    assert kept[1][PERM].tolist() == [True, True, False, False, False, False]
    assert kept.sum().item() == 4
    only_best = modify_logits_for_min_p_filtering(logits.clone(), 1.0).isfinite()
    assert only_best.sum(dim=1).tolist() == [1, 1]


def test_filters_edge_cases():
    logits = table()
    assert torch.equal(modify_logits_for_top_p_filtering(logits.clone(), 1.0), logits)  # 1 = off
    assert torch.equal(modify_logits_for_top_p_filtering(logits.clone(), 0.0), logits)  # 0 = off
    assert modify_logits_for_top_p_filtering(logits.clone(), 0.01).isfinite().sum().item() == 2  # best stays
    assert torch.equal(modify_logits_for_top_k_filtering(logits.clone(), 0), logits)
    assert torch.equal(modify_logits_for_top_k_filtering(logits.clone(), 99), logits)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert modify_logits_for_top_k_filtering(ties.clone(), 1).isfinite().sum().item() == 2
    assert torch.equal(sample(logits, top_k=1), logits.argmax(-1))  # greedy ignores temperature
    assert torch.equal(sample(logits, top_k=1, temperature=1e-9), logits.argmax(-1))


def test_sampling_does_not_modify_its_input_and_is_reproducible():
    logits = table()
    before = logits.clone()
    a = sample(logits, top_k=3, top_p=0.9, min_p=0.1, temperature=0.7, generator=torch.Generator().manual_seed(0))
    b = sample(logits, top_k=3, top_p=0.9, min_p=0.1, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits, before) and torch.equal(a, b)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0], [1.0, 1.0, -2.0, 4.0, -0.5]])
    prev = torch.tensor([[0, 1, 1], [3, 2, 3]])  # repeats count once
    expected = logits.clone()
    expected[0, 0], expected[0, 1] = 2.0 / 1.5, -1.0 * 1.5
    expected[1, 3], expected[1, 2] = 4.0 / 1.5, -2.0 * 1.5
    assert torch.allclose(modify_logit_for_repetition_penalty(logits.clone(), prev, 1.5), expected)
    seen = torch.zeros(2, 5, dtype=torch.bool).scatter_(1, prev, True)
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.5), expected)
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


@pytest.mark.parametrize("kwargs, name", [
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_k=0, top_p=-0.1), "top_p"), (dict(top_k=0, top_p=1.01), "top_p"),
    (dict(top_k=0, top_p=math.nan), "top_p"),
    (dict(top_k=0, min_p=-0.5), "min_p"), (dict(top_k=0, min_p=1.5), "min_p"),
    (dict(top_k=0, temperature=0.0), "temperature"), (dict(top_k=0, temperature=-2.0), "temperature"),
    (dict(top_k=0, temperature=math.inf), "temperature"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
])
def test_invalid_values_are_value_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        validate_sampling_args(**kwargs)


def test_valid_edges_are_accepted():
    validate_sampling_args(top_k=0, top_p=1.0, min_p=1.0, temperature=0.1)
    validate_sampling_args(top_k=1, temperature=0.0)  # greedy: temperature unused, as in the official
    validate_sampling_args(top_k=0, top_p=0.0, min_p=0.0)
