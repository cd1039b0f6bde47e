"""Batched steps: steps of different sessions that wait at the same time run as one engine call.

The engine computes one batch at a time, in one worker thread. Steps that arrive while it is busy
wait here; when it is free, the next batch is taken from the waiting steps in fair-share order
(highest priority first, ties in arrival order), up to `max_steps` steps and `max_tokens` tokens,
at most one step per session (a session's next step needs the output of the one before). When the
engine is free, a step waits at most `gather_s` for the steps of the other sessions that are active
here (ran a step in the last ACTIVE_S) and due within that window, so that they share one forward
pass: on a busy CPU the steps of concurrent sessions otherwise arrive staggered and each runs alone.
A session is due when its last step finished here less than its usual gap ago (the time its steps
take to come back: the rest of the route, the coordinator's head; learned per session) before the
window ends, or when its gap is not known yet. So a step of a session alone on the node never waits,
and one is not held for sessions whose steps come back later than the window (a fixed 20 ms wait for
every active session cost 4 concurrent sessions a quarter of their throughput).
"""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from coop.model.engine import SpanEngine, StepInput

DEFAULT_MAX_BATCH_STEPS = 16
# How long the engine, when free, holds back a step for the sessions it expects next (those that ran
# a step here in the last ACTIVE_S and have none waiting), so that they run in one forward pass.
DEFAULT_GATHER_S = 0.02
ACTIVE_S = 0.5
GAP_WEIGHT = 0.5  # the weight of a session's latest gap in its usual gap (an exponential average)
# Enough for a prefill chunk to ride along with the decode rows of the other sessions.
DEFAULT_MAX_BATCH_TOKENS = 512


@dataclass(frozen=True)
class Waiting:
    """What choosing a batch needs to know about a waiting step."""

    session_id: str
    tokens: int
    priority: float
    arrival: int
    since: float = 0.0  # when it began to wait (event loop time)


def choose_batch(waiting: list[Waiting], max_steps: int, max_tokens: int) -> list[int]:
    """Indices into `waiting` of the next batch, in the order they run.

    Fair-share order; the first step is always taken, whatever its size; the batch ends at the first
    step that would pass `max_tokens`, so a big step is never overtaken by smaller ones of lower
    priority for long. A second step of a session already in the batch waits for the next one.
    """
    order = sorted(range(len(waiting)), key=lambda i: (-waiting[i].priority, waiting[i].arrival))
    chosen: list[int] = []
    sessions: set[str] = set()
    tokens = 0
    for i in order:
        if len(chosen) == max_steps:
            break
        step = waiting[i]
        if step.session_id in sessions:
            continue
        if chosen and tokens + step.tokens > max_tokens:
            break
        chosen.append(i)
        sessions.add(step.session_id)
        tokens += step.tokens
    return chosen


@dataclass
class _Pending:
    about: Waiting
    step: StepInput
    future: asyncio.Future[torch.Tensor] = field(repr=False)


class StepBatcher:
    """Runs engine steps in batches, in one worker thread, in fair-share order."""

    def __init__(
        self,
        engine: SpanEngine,
        *,
        max_steps: int = DEFAULT_MAX_BATCH_STEPS,
        max_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        gather_s: float = DEFAULT_GATHER_S,
    ) -> None:
        """`gather_s`: the longest a step waits for the other active sessions' steps (0: never)."""
        self.engine = engine
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.gather_s = gather_s
        self._last_ran: dict[str, float] = {}  # session -> when its last step here finished
        self._gap_s: dict[str, float] = {}  # session -> usual time from its step finishing to its next arriving
        self._timer: asyncio.TimerHandle | None = None
        self.batches_run = 0
        self.steps_batched = 0  # steps that ran in a batch of two or more
        self._waiting: list[_Pending] = []
        self._arrival = itertools.count()
        self._busy = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coop-compute")

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def step(
        self, session_id: str, hidden: torch.Tensor, start_position: int, *, priority: float, rewind: bool = False
    ) -> torch.Tensor:
        """The engine's output for this step, once a batch that holds it has run (`rewind`: see StepInput)."""
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        now = asyncio.get_running_loop().time()
        self._learn_gap(session_id, now)
        about = Waiting(session_id, hidden.shape[1], priority, next(self._arrival), now)
        self._waiting.append(_Pending(about, StepInput(session_id, hidden, start_position, rewind), future))
        self._start_next()
        return await future

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _start_next(self) -> None:
        self._waiting = [p for p in self._waiting if not p.future.done()]  # callers that gave up
        if self._busy or self._closed or not self._waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = min(p.about.since for p in self._waiting) + self.gather_s
        if now < deadline and len(self._waiting) < self.max_steps and self._expected(now, deadline):
            if self._timer is None:
                self._timer = loop.call_at(deadline, self._on_timer)
            return
        chosen = choose_batch([p.about for p in self._waiting], self.max_steps, self.max_tokens)
        batch = [self._waiting[i] for i in chosen]
        taken = set(chosen)
        self._waiting = [p for i, p in enumerate(self._waiting) if i not in taken]
        self._busy = True
        self._task = asyncio.get_running_loop().create_task(self._run(batch))

    def _on_timer(self) -> None:
        self._timer = None
        self._start_next()

    def _learn_gap(self, session_id: str, now: float) -> None:
        finished = self._last_ran.get(session_id)
        if finished is not None:
            gap = now - finished
            usual = self._gap_s.get(session_id, gap)
            self._gap_s[session_id] = GAP_WEIGHT * gap + (1 - GAP_WEIGHT) * usual

    def _expected(self, now: float, deadline: float) -> bool:
        """Whether a session that ran here lately, and is still open, has no step waiting yet and is due
        before `deadline` (or has no usual gap yet)."""
        self._last_ran = {s: t for s, t in self._last_ran.items() if now - t < ACTIVE_S and self.engine.is_open(s)}
        self._gap_s = {s: gap for s, gap in self._gap_s.items() if s in self._last_ran}
        waiting = {p.about.session_id for p in self._waiting}
        return any(s not in waiting and t + self._gap_s.get(s, 0.0) <= deadline for s, t in self._last_ran.items())

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._executor, self.engine.step_batch, [p.step for p in batch])
            self.batches_run += 1

            if len(batch) > 1:
                self.steps_batched += len(batch)
            finished = loop.time()
            for pending in batch:
                self._last_ran[pending.about.session_id] = finished
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
        except Exception as exc:  # the batch as a whole failed: each of its steps reports it
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        finally:
            self._busy = False
            self._task = None
            self._start_next()
