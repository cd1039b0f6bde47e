"""Multi-token steps: prompt-lookup drafts, KV-cache rewinds in the engine, and greedy-exact decoding."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from coop.errors import InvalidPositions
from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine, StepInput
from coop.model.prepare import prepare
from coop.pipeline.drafts import PAUSE_STEPS, NgramDrafter
from coop.pipeline.generation import collect_tokens
from coop.pipeline.local import LocalChain
from coop.pipeline.sampling import SamplingParams
from tests.tiny_models import save_tiny_model

HIDDEN = 64
ATOL = 1e-5
PROMPT = [5, 17, 42, 8, 91, 3, 60, 5, 17, 42, 8]


def _hidden(n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(seed))


# -- drafts -------------------------------------------------------------------------------------


def test_drafts_follow_the_latest_earlier_occurrence_of_the_longest_suffix() -> None:
    drafter = NgramDrafter(4)
    # "8 9" occurred twice; the latest occurrence is followed by 7 7 1
    assert drafter.propose([8, 9, 1, 2, 3, 8, 9, 7, 7, 1, 8, 9], limit=10) == [7, 7, 1, 8]
    # the 3-gram "2 8 9" wins over the later 2-gram "8 9"
    assert drafter.propose([2, 8, 9, 4, 4, 8, 9, 5, 2, 8, 9], limit=10) == [4, 4, 8, 9]
    assert drafter.propose([8, 9, 1, 2, 3, 8, 9], limit=2) == [1, 2]
    assert drafter.propose([1, 2, 3, 4, 5], limit=10) == []  # no suffix occurred before
    assert drafter.propose([8, 9, 1, 8, 9], limit=0) == []


def test_draft_size_grows_on_acceptance_and_shrinks_on_rejection() -> None:
    drafter = NgramDrafter(5)
    drafter.update(5, 2)
    drafter.update(4, 0)
    drafter.update(3, 1)
    assert drafter.size == 2
    drafter.update(2, 2)
    assert drafter.size == 4
    for _ in range(3):
        drafter.update(2, 1)
    assert drafter.size == 1
    # a rejected one-token draft pauses drafting for PAUSE_STEPS steps
    drafter.update(1, 0)
    tokens = [8, 9, 1, 8, 9]
    assert [drafter.propose(tokens, limit=10) for _ in range(PAUSE_STEPS + 1)] == [[]] * PAUSE_STEPS + [[1]]
    assert (drafter.proposed, drafter.accepted) == (21, 8)
    with pytest.raises(ValueError, match="max_tokens"):
        NgramDrafter(0)


# -- the engine's rewind ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str) -> SpanEngine:
    return SpanEngine.load(tiny_llama_dir, 1, 4, device="cpu")


def test_rewind_drops_rejected_tokens_and_matches_a_run_without_them(engine: SpanEngine) -> None:
    prompt, kept, rejected, after = _hidden(6, 0), _hidden(2, 1), _hidden(3, 2), _hidden(1, 3)
    spec = engine.open_session(max_length=16)
    plain = engine.open_session(max_length=16)
    try:
        engine.step(spec, prompt, 0)
        engine.step(plain, prompt, 0)
        engine.step(spec, torch.cat([kept, rejected], dim=1), 6)  # 5 tokens: 2 kept, 3 rejected
        engine.step(plain, kept, 6)
        assert engine.session_length(spec) == 11
        with pytest.raises(InvalidPositions, match="rewinds"):  # without the flag, positions must follow on
            engine.step(spec, after, 8)
        out_spec = engine.step(spec, after, 8, rewind=True)
        out_plain = engine.step(plain, after, 8)
        assert engine.session_length(spec) == engine.session_length(plain) == 9
        assert engine.cache_bytes(spec) == engine.cache_bytes(plain)
        torch.testing.assert_close(out_spec, out_plain, atol=ATOL, rtol=0)
        # a rewind to where the cache ends already is a no-op; past it, an error that says why
        engine.step(spec, _hidden(1, 4), 9, rewind=True)
        with pytest.raises(InvalidPositions, match=r"cannot rewind .* to position 12"):
            engine.step(spec, after, 12, rewind=True)
        assert engine.session_length(spec) == 10
    finally:
        engine.close_session(spec)
        engine.close_session(plain)


def test_rewind_in_a_batch_leaves_the_other_sessions_alone(engine: SpanEngine) -> None:
    a, b, ref = (engine.open_session(max_length=16) for _ in range(3))
    try:
        for session in (a, b, ref):
            engine.step(session, _hidden(4, 10), 0)
        engine.step(a, _hidden(3, 11), 4)
        results = engine.step_batch([StepInput(a, _hidden(2, 12), 5, rewind=True), StepInput(b, _hidden(2, 12), 4)])
        assert not isinstance(results[0], Exception) and not isinstance(results[1], Exception)
        assert engine.session_length(a) == 7 and engine.session_length(b) == 6
        engine.step(ref, _hidden(3, 11)[:, :1], 4)
        torch.testing.assert_close(results[0], engine.step(ref, _hidden(2, 12), 5), atol=ATOL, rtol=0)
    finally:
        for session in (a, b, ref):
            engine.close_session(session)


def test_sliding_window_caches_refuse_to_rewind(tmp_path: Path) -> None:
    prepare(str(save_tiny_model("mistral", tmp_path / "hf")), tmp_path / "coop", dtype="float32")
    engine = SpanEngine.load(tmp_path / "coop", 0, 2, device="cpu")
    session = engine.open_session(max_length=16)
    engine.step(session, _hidden(4, 0), 0)
    with pytest.raises(InvalidPositions, match=r"sliding-window .* turn multi-token steps off"):
        engine.step(session, _hidden(1, 1), 2, rewind=True)


# -- greedy decoding with multi-token steps ------------------------------------------------------


class CountingChain(LocalChain):
    """A LocalChain that counts its steps and the tokens they carried."""

    def __init__(self, engines: Sequence[SpanEngine], *, max_length: int, draft_tokens: int) -> None:
        super().__init__(engines, max_length=max_length, draft_tokens=draft_tokens)
        self.steps = 0
        self.tokens = 0

    async def step(self, hidden: torch.Tensor, start_position: int, token_ids: Sequence[int] = ()) -> torch.Tensor:
        self.steps += 1
        self.tokens += hidden.shape[1]
        return await super().step(hidden, start_position, token_ids)


@pytest.mark.parametrize("max_tokens", [1, 7, 40])
def test_multi_token_steps_give_the_tokens_of_one_token_steps(tiny_llama_dir: str, max_tokens: int) -> None:
    client = ClientPart.load(tiny_llama_dir, device="cpu")
    engines = [SpanEngine.load(tiny_llama_dir, a, b, device="cpu") for a, b in [(0, 3), (3, 6)]]
    params = SamplingParams(max_tokens=max_tokens)

    def run(draft_tokens: int) -> tuple[list[int], CountingChain]:
        chain = CountingChain(engines, max_length=len(PROMPT) + max_tokens, draft_tokens=draft_tokens)
        try:
            return asyncio.run(collect_tokens(client, chain, PROMPT, params)), chain
        finally:
            asyncio.run(chain.close())

    plain, plain_chain = run(0)
    spec, spec_chain = run(4)
    assert spec == plain and len(plain) == max_tokens
    assert plain_chain.steps == max_tokens  # the prompt, then one step per token but the last
    if max_tokens == 40:  # a random tiny model repeats itself: drafts were taken, round trips saved
        assert spec_chain.steps < plain_chain.steps
        assert spec_chain.tokens > plain_chain.tokens  # ... at the price of computing rejected drafts


def test_sampling_requests_keep_one_token_steps(tiny_llama_dir: str) -> None:
    client = ClientPart.load(tiny_llama_dir, device="cpu")
    engines = [SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")]
    chain = CountingChain(engines, max_length=64, draft_tokens=4)
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=3)
    try:
        tokens = asyncio.run(collect_tokens(client, chain, PROMPT, params))
    finally:
        asyncio.run(chain.close())
    assert len(tokens) == 20 and chain.steps == 20 and chain.tokens == len(PROMPT) + 19
