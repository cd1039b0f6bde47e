"""Batched steps: choosing a batch (pure), the engine's packed forward pass, and the node's batcher."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
import torch

from coop.errors import (
    CoopError,
    InvalidInput,
    InvalidPositions,
    InvalidTensor,
    SessionLimitExceeded,
    UnknownSession,
)
from coop.model.engine import SpanEngine, StepInput
from coop.node.batching import StepBatcher, Waiting, choose_batch
from tests.waiting import wait_for_async

HIDDEN = 64
# Packing reorders sums (other matmul shapes, a masked softmax over more keys): float32 noise only.
BATCH_ATOL = 1e-5
LOW, MID, HIGH = 0.1, 0.5, 0.9


def _hidden(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(seed))


# -- choose_batch -----------------------------------------------------------------------------


def test_batch_is_taken_in_fair_share_order() -> None:
    waiting = [Waiting("a", 1, LOW, 0), Waiting("b", 1, HIGH, 1), Waiting("c", 1, MID, 2), Waiting("d", 1, HIGH, 3)]
    assert choose_batch(waiting, max_steps=3, max_tokens=100) == [1, 3, 2]


def test_one_step_per_session_per_batch() -> None:
    waiting = [Waiting("a", 1, HIGH, 0), Waiting("a", 1, HIGH, 1), Waiting("b", 1, LOW, 2)]
    assert choose_batch(waiting, max_steps=8, max_tokens=100) == [0, 2]


def test_token_cap_ends_the_batch_but_a_big_first_step_runs_alone() -> None:
    waiting = [Waiting("big", 300, HIGH, 0), Waiting("a", 1, MID, 1)]
    assert choose_batch(waiting, max_steps=8, max_tokens=256) == [0]
    waiting = [Waiting("a", 1, HIGH, 0), Waiting("prefill", 40, MID, 1), Waiting("big", 300, LOW, 2)]
    assert choose_batch(waiting, max_steps=8, max_tokens=256) == [0, 1]


# -- the engine -------------------------------------------------------------------------------


@pytest.fixture()
def engine(tiny_llama_dir: str) -> SpanEngine:
    return SpanEngine.load(tiny_llama_dir, 1, 6, device="cpu")


def test_packed_steps_equal_single_steps(engine: SpanEngine) -> None:
    """Prefills and decodes of sessions at different positions, one of them over part of the span."""
    assert engine.can_batch
    spans = {"a": (1, 6), "b": (1, 6), "c": (2, 4), "d": (1, 6)}
    for sid, (start, end) in spans.items():
        engine.open_session(f"one-{sid}", max_length=32, start=start, end=end)
        engine.open_session(f"many-{sid}", max_length=32, start=start, end=end)
    lengths = dict.fromkeys(spans, 0)
    rounds = [{"a": 5, "b": 2}, {"a": 1, "b": 1, "c": 7, "d": 3}, {"a": 1, "b": 4, "c": 1, "d": 1}]
    for round_index, sizes in enumerate(rounds):
        steps = [
            StepInput(f"many-{sid}", _hidden(n, seed=round_index * 10 + ord(sid)), lengths[sid])
            for sid, n in sizes.items()
        ]
        batched = engine.step_batch(steps)
        for sid, step, output in zip(sizes, steps, batched, strict=True):
            single = engine.step(f"one-{sid}", step.hidden, step.start_position)
            assert isinstance(output, torch.Tensor)
            assert output.shape == single.shape
            torch.testing.assert_close(output, single, atol=BATCH_ATOL, rtol=0)
            lengths[sid] += step.hidden.shape[1]
    for sid, length in lengths.items():
        assert engine.session_length(f"many-{sid}") == length


def test_a_bad_step_fails_alone(engine: SpanEngine) -> None:
    for sid in ("good", "rewinds", "full", "twice", "ref"):
        engine.open_session(sid, max_length=4)
    for sid in ("good", "rewinds", "full", "twice", "ref"):
        engine.step(sid, _hidden(2), 0)
    engine.step("full", _hidden(2), 2)
    results = engine.step_batch(
        [
            StepInput("good", _hidden(1, seed=5), 2),
            StepInput("rewinds", _hidden(1), 1),
            StepInput("ghost", _hidden(1), 0),
            StepInput("full", _hidden(1), 4),
            StepInput("twice", _hidden(1), 2),
            StepInput("twice", _hidden(1), 3),
            StepInput("ref", torch.full((1, 1, HIDDEN), float("nan")), 2),
        ]
    )
    kinds = [type(r) if isinstance(r, CoopError) else torch.Tensor for r in results]
    assert kinds == [
        torch.Tensor,
        InvalidPositions,
        UnknownSession,
        SessionLimitExceeded,
        torch.Tensor,
        InvalidInput,
        InvalidTensor,
    ]
    assert "NaN" in str(results[6])
    assert [engine.session_length(s) for s in ("good", "rewinds", "full", "twice", "ref")] == [3, 2, 4, 3, 2]
    # the failed ones go on as if nothing happened
    expected = engine.step("ref", _hidden(1, seed=5), 2)
    torch.testing.assert_close(results[0], expected, atol=BATCH_ATOL, rtol=0)  # type: ignore[arg-type]


def test_a_session_that_overflows_does_not_poison_the_others(engine: SpanEngine) -> None:
    """Masked-out keys still meet every query (NaN * 0 is NaN): an overflowing session is cut off."""
    for sid in ("ok", "overflows", "ref"):
        engine.open_session(sid, max_length=8)
        engine.step(sid, _hidden(2, seed=1), 0)
    layer = engine._layers[3]

    def poison(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        output[:, 1:] = float("inf")  # the packed rows of the second session ("overflows")
        return output

    handle = layer.self_attn.v_proj.register_forward_hook(poison)
    try:
        results = engine.step_batch([StepInput("ok", _hidden(1, seed=2), 2), StepInput("overflows", _hidden(1), 2)])
    finally:
        handle.remove()
    assert isinstance(results[1], InvalidTensor) and "block 3" in str(results[1])
    expected = engine.step("ref", _hidden(1, seed=2), 2)
    assert isinstance(results[0], torch.Tensor) and bool(torch.isfinite(results[0]).all())
    torch.testing.assert_close(results[0], expected, atol=BATCH_ATOL, rtol=0)


# -- the batcher ------------------------------------------------------------------------------


class _RecordingEngine:
    """Returns each step's hidden states; while `hold` is set, a call waits until released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.hold = True
        self.closed: set[str] = set()
        self.started = threading.Event()  # set once a batch is in the engine

    def is_open(self, session_id: str) -> bool:
        return session_id not in self.closed

    def step_batch(self, steps: Sequence[StepInput]) -> list[torch.Tensor | CoopError]:
        self.started.set()
        if self.hold:
            self.release.wait(10)
        self.batches.append([s.session_id for s in steps])
        return [UnknownSession("gone") if s.session_id == "gone" else s.hidden for s in steps]


def test_steps_that_wait_together_run_together() -> None:
    async def scenario() -> StepBatcher:
        batcher = StepBatcher(fake, max_steps=3, gather_s=0)  # type: ignore[arg-type]
        try:
            first = asyncio.create_task(batcher.step("first", _hidden(1), 0, priority=LOW))
            await wait_for_async("the lone first step to start at once", fake.started.is_set, 10)
            steps = [("low", LOW), ("gone", MID), ("high", HIGH), ("mid", MID), ("first", HIGH)]
            queued = {
                sid: asyncio.create_task(batcher.step(sid, _hidden(1, seed=i), 0, priority=p))
                for i, (sid, p) in enumerate(steps)
            }
            await wait_for_async("the other steps to queue", lambda: batcher.queued == len(steps), 10)
            fake.release.set()
            assert torch.equal(await first, _hidden(1))
            assert torch.equal(await queued["high"], _hidden(1, seed=2))
            with pytest.raises(UnknownSession):
                await queued["gone"]
            await asyncio.gather(*(t for sid, t in queued.items() if sid != "gone"))
            return batcher
        finally:
            batcher.close()

    fake = _RecordingEngine()
    batcher = asyncio.run(scenario())
    assert fake.batches == [["first"], ["high", "first", "gone"], ["mid", "low"]]
    assert batcher.batches_run == 3 and batcher.steps_batched == 5


def test_a_free_engine_holds_a_step_for_the_other_active_sessions() -> None:
    async def scenario() -> None:
        batcher = StepBatcher(fake, gather_s=0.5)  # type: ignore[arg-type]
        try:
            await batcher.step("a", _hidden(1), 0, priority=MID)  # alone on the node: runs at once
            await batcher.step("b", _hidden(1), 0, priority=MID)  # held for "a" at most gather_s
            a = asyncio.create_task(batcher.step("a", _hidden(1), 1, priority=MID))
            await asyncio.sleep(0.1)
            assert not a.done()  # held for "b"
            await asyncio.wait_for(asyncio.gather(a, batcher.step("b", _hidden(1), 1, priority=MID)), 0.2)
            fake.closed.add("b")  # a session that has ended is not waited for
            await asyncio.wait_for(batcher.step("a", _hidden(1), 2, priority=MID), 0.2)
        finally:
            batcher.close()

    fake = _RecordingEngine()
    fake.hold = False
    asyncio.run(scenario())
    assert fake.batches == [["a"], ["b"], ["a", "b"], ["a"]]


def test_a_step_is_not_held_for_a_session_whose_steps_come_back_later_than_the_window() -> None:
    async def scenario() -> float:
        batcher = StepBatcher(fake, gather_s=GATHER_S)  # type: ignore[arg-type]
        try:
            await batcher.step("slow", _hidden(1), 0, priority=MID)
            await asyncio.sleep(SLOW_GAP_S)  # its steps come back after longer than the window
            await batcher.step("slow", _hidden(1), 1, priority=MID)
            began = asyncio.get_running_loop().time()
            await batcher.step("fast", _hidden(1), 0, priority=MID)  # "slow" is not due within GATHER_S
            return asyncio.get_running_loop().time() - began
        finally:
            batcher.close()

    GATHER_S, SLOW_GAP_S = 0.3, 0.4
    fake = _RecordingEngine()
    fake.hold = False
    assert asyncio.run(scenario()) < GATHER_S
    assert fake.batches == [["slow"], ["slow"], ["fast"]]
