"""Next-token choice with per-row settings, so requests with different settings share one batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Seeds `torch.Generator.manual_seed` accepts (a signed or unsigned 64-bit integer).
SEED_RANGE = (-(2**63), 2**64 - 1)

#: Accepted `repetition_penalty` values (1 = off; above 1 discourages repeats, below 1 encourages them).
#: Outside this range the penalty scales logits by more than 100x, which only degenerates the answer.
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass
class SamplingParams:
    """How one request picks its tokens. `do_sample=False` (or temperature 0) is greedy."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be in [{low:g}, {high:g}], got {self.repetition_penalty}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def seen_mask(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """`[vocab]` bool mask of the token ids in `ids` `[n]` (the tokens a repetition penalty applies to)."""
    mask = torch.zeros(vocab, dtype=torch.bool, device=ids.device)
    mask[ids] = True
    return mask


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on the tokens marked in `seen` (a bool mask shaped like `logits` `[..., vocab]`):
    positive logits divided, negative multiplied."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def next_token_distribution(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """The float64 probabilities `[..., vocab]` one sampled step draws from, row by row: repetition penalty
    over the tokens marked in `seen` (bool, shaped like `logits`), temperature, top-k, then top-p (the
    order transformers applies them in). Every row is processed at once, on the logits' device.

    The logits are shifted so their maximum is 0 before dividing by the temperature, in float64, so any
    positive temperature (down to the smallest float) and any accepted penalty give finite probabilities.
    """
    logits = logits.double()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = penalize_repeats(logits, seen, params.repetition_penalty)
    logits = (logits - logits.max(-1, keepdim=True).values) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def pick_tokens(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token `[B]` of every row of `logits` `[B, vocab]` (greedy or sampled as `params` say; `seen`
    `[B, vocab]` marks the tokens the repetition penalty applies to), computed on the logits' device without
    reading anything back to the host."""
    if params.greedy:
        if params.repetition_penalty != 1.0 and seen is not None:
            logits = penalize_repeats(logits.double(), seen, params.repetition_penalty)
        return logits.argmax(-1)
    return torch.multinomial(next_token_distribution(logits, params, seen), 1, generator=generator)[:, 0]


def row_distribution(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """`next_token_distribution` of one row `[vocab]` whose penalised tokens are the ids `seen` `[n]`."""
    mask = None if seen is None else seen_mask(seen.to(logits.device), logits.shape[-1])
    return next_token_distribution(logits, params, mask)


def pick_row(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of one row's `logits` `[vocab]` as a 0-d tensor on their device (nothing is read
    back); `seen` `[n]` are the ids the penalty applies to."""
    mask = None if seen is None else seen_mask(seen.to(logits.device), logits.shape[-1])[None]
    return pick_tokens(logits[None], params, mask, generator)[0]
