"""Sampling: greedy, top-k, top-p and seeds, on hand-made logits."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from coop.model.manifest import SamplingDefaults
from coop.pipeline.sampling import (
    API_TEMPERATURE,
    API_TOP_K,
    API_TOP_P,
    SamplingParams,
    make_generator,
    sample_token,
    with_defaults,
)

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def _draws(params: SamplingParams, n: int = 400) -> set[int]:
    generator = make_generator(params)
    return {sample_token(LOGITS, params, generator) for _ in range(n)}


def test_greedy_takes_the_argmax() -> None:
    assert sample_token(LOGITS, SamplingParams(), None) == 1


def test_top_k_and_top_p_restrict_the_choice() -> None:
    assert _draws(SamplingParams(temperature=1.0, top_k=2, seed=1)) == {1, 2}
    # softmax(LOGITS): p(1)=0.63, p(2)=0.23 -> top_p 0.7 keeps exactly tokens 1 and 2
    assert _draws(SamplingParams(temperature=1.0, top_p=0.7, seed=1)) == {1, 2}
    assert _draws(SamplingParams(temperature=1.0, top_p=0.5, seed=1)) == {1}
    assert len(_draws(SamplingParams(temperature=1.0, seed=1))) == 5


def test_seed_makes_sampling_repeatable() -> None:
    params = SamplingParams(temperature=1.0, seed=42)
    first, second = make_generator(params), make_generator(params)
    assert [sample_token(LOGITS, params, first) for _ in range(30)] == [
        sample_token(LOGITS, params, second) for _ in range(30)
    ]


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -1}])
def test_invalid_params_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        SamplingParams(**bad)


def test_extreme_values_still_give_a_token() -> None:
    assert (
        sample_token(LOGITS, SamplingParams(temperature=1.0, top_p=5e-324, seed=0), make_generator(SamplingParams()))
        == 1
    )
    tiny = SamplingParams(temperature=1e-300, seed=0)
    assert tiny.greedy and sample_token(LOGITS, tiny, make_generator(tiny)) == 1


RECOMMENDED = SamplingDefaults(temperature=0.2, top_p=0.9, origin="model card")


def test_unset_parameters_take_the_recommendation_then_openais_defaults() -> None:
    params = with_defaults(RECOMMENDED, max_tokens=8)
    assert (params.temperature, params.top_p, params.top_k) == (0.2, 0.9, API_TOP_K)
    bare = with_defaults(SamplingDefaults(), max_tokens=8)
    assert (bare.temperature, bare.top_p, bare.top_k) == (API_TEMPERATURE, API_TOP_P, API_TOP_K)


def test_explicit_values_win_greedy_included() -> None:
    greedy = with_defaults(RECOMMENDED, max_tokens=8, temperature=0.0)
    assert greedy.greedy and greedy.top_p == 0.9
    explicit = with_defaults(RECOMMENDED, max_tokens=8, temperature=1.3, top_p=1.0, top_k=5, seed=4, stop=("x",))
    assert (explicit.temperature, explicit.top_p, explicit.top_k, explicit.seed, explicit.stop) == (
        1.3,
        1.0,
        5,
        4,
        ("x",),
    )


def test_recommended_sampling_is_validated() -> None:
    with pytest.raises(ValidationError):
        SamplingDefaults(temperature=-0.5)
    with pytest.raises(ValidationError):
        SamplingDefaults(top_p=0.0)
