"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

Pure functions over a logits vector so they can be tested without a model. `with_defaults` fills
what a request leaves unset from the model's recommended sampling (its manifest), then from
OpenAI's defaults, as vLLM does with a model's generation_config.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from coop.model.manifest import SamplingDefaults

MIN_TEMPERATURE = 1e-4
# For a parameter that neither the request nor the model sets: OpenAI's API defaults.
API_TEMPERATURE = 1.0
API_TOP_P = 1.0
API_TOP_K = 0


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True)

    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)  # 0 = greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # 0 = no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf and sampling is argmax anyway.
        return self.temperature < MIN_TEMPERATURE


def with_defaults(
    recommended: SamplingDefaults,
    *,
    max_tokens: int,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
) -> SamplingParams:
    """None means unset: the model's recommendation, else OpenAI's default. An explicit value,
    temperature 0 (greedy) included, is always kept. Raises pydantic's ValidationError."""

    def pick(value: float | None, recommendation: float | None, api_default: float) -> float:
        if value is not None:
            return value
        return api_default if recommendation is None else recommendation

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick(temperature, recommended.temperature, API_TEMPERATURE),
        top_p=pick(top_p, recommended.top_p, API_TOP_P),
        top_k=int(pick(top_k, recommended.top_k, API_TOP_K)),
        seed=seed,
        stop=stop,
    )


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else int(torch.seed() % (2**63)))
    return generator


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: [vocab] float32 for the last position."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float().cpu() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first is always kept)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        drop[0] = False  # the most likely token always survives, however small top_p is
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
