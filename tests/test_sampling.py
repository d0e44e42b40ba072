"""The sampler against transformers' own logits processors, seeds, and extreme but accepted values."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hyperowl.engine.sampling import (
    SamplingParams,
    next_token_distribution,
    pick_row,
    pick_tokens,
    row_distribution,
    seen_mask,
)

VOCAB = 200

CASES = [  # temperature, top_k, top_p, repetition_penalty
    (1.0, 0, 1.0, 1.0),
    (0.7, 0, 1.0, 1.0),
    (1.5, 0, 1.0, 1.0),
    (1.0, 10, 1.0, 1.0),
    (1.0, 0, 0.9, 1.0),
    (0.8, 0, 0.5, 1.0),
    (1.0, 1, 1.0, 1.0),
    (1.0, 0, 1.0, 1.3),
    (1.0, 0, 1.0, 0.7),
    (0.6, 40, 0.8, 1.2),
    (1.3, 5, 0.95, 2.0),
]


def transformers_distribution(logits: torch.Tensor, seen: torch.Tensor, temperature: float, top_k: int, top_p: float, penalty: float) -> torch.Tensor:
    """The probabilities transformers' `generate` samples from, with its processors in its order."""
    scores = logits[None].clone()
    processors = []
    if penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    for processor in processors:
        scores = processor(seen[None], scores)
    return scores[0].softmax(-1)


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "penalty"), CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distribution_equals_transformers_processors(temperature: float, top_k: int, top_p: float, penalty: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=generator) * 3
    seen = torch.randint(0, VOCAB, (30,), generator=generator)
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    ours = row_distribution(logits, params, seen)
    theirs = transformers_distribution(logits, seen, temperature, top_k, top_p, penalty).double()
    assert torch.equal(ours > 0, theirs > 0)  # the same tokens are allowed
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5)
    if top_k or top_p < 1.0:
        assert int((ours > 0).sum()) < VOCAB  # the case does filter


def test_samples_follow_the_distribution_and_the_seed() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(do_sample=True, temperature=0.9, top_p=0.95, seed=5)
    expected = row_distribution(logits, params, None)
    generator = params.generator(torch.device("cpu"))
    draws = torch.tensor([int(pick_row(logits, params, None, generator)) for _ in range(20000)])
    frequencies = torch.bincount(draws, minlength=len(logits)).double() / len(draws)
    # 20000 draws: the standard error of a frequency is at most 0.0036; 0.015 is four of them
    assert torch.allclose(frequencies, expected, atol=0.015)
    assert frequencies[expected == 0].sum() == 0  # top-p removed tokens are never drawn

    def draws_with(seed: int) -> list[int]:
        seeded = SamplingParams(do_sample=True, temperature=1.0, seed=seed)
        generator = seeded.generator(torch.device("cpu"))
        return [int(pick_row(logits, seeded, None, generator)) for _ in range(40)]

    assert draws_with(1) == draws_with(1)
    assert draws_with(1) != draws_with(2)


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-300])
def test_tiny_temperatures_stay_finite_and_pick_the_top_token(temperature: float) -> None:
    logits = torch.tensor([0.5, 3.0, 2.999, -1.0]) * 10
    params = SamplingParams(do_sample=True, temperature=temperature, repetition_penalty=0.01, seed=0)
    probs = row_distribution(logits, params, torch.tensor([3]))
    assert torch.isfinite(probs).all() and probs.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert int(pick_row(logits, params, torch.tensor([3]), params.generator(torch.device("cpu")))) == 1


@pytest.mark.parametrize(
    "field",
    [{"temperature": float("nan")}, {"temperature": float("inf")}, {"repetition_penalty": 1e-300}, {"repetition_penalty": 101.0},
     {"seed": 2**64}, {"seed": -(2**63) - 1}],
)  # fmt: skip
def test_values_outside_the_documented_ranges_are_refused(field: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(field))):
        SamplingParams(do_sample=True, **field)


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "penalty"), CASES)
def test_the_batched_distribution_equals_each_rows(temperature: float, top_k: int, top_p: float, penalty: float) -> None:
    """`next_token_distribution` over a batch (what `generate` uses on the device) equals `row_distribution`
    of each row with its own penalised tokens."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, VOCAB, generator=g) * 3
    seen_ids = [torch.randint(0, VOCAB, (n,), generator=g) for n in (0, 1, 7, 30)]
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    mask = torch.stack([seen_mask(ids, VOCAB) for ids in seen_ids])
    batched = next_token_distribution(logits, params, mask)
    for row, ids in enumerate(seen_ids):
        torch.testing.assert_close(batched[row], row_distribution(logits[row], params, ids), atol=1e-12, rtol=0)
    greedy = SamplingParams(repetition_penalty=penalty)
    picked = pick_tokens(logits, greedy, mask, None)
    assert picked.tolist() == [int(pick_row(logits[row], greedy, ids, None)) for row, ids in enumerate(seen_ids)]
