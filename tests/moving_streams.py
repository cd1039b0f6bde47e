"""8 greedy streams through a node that leaves mid-generation (drain, pause, rebalance move): none may fail,
and each must give the tokens of a single-process run (tests/e2e/test_drain.py, test_rebalance.py)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.chat_requests import stream_greedy_chat
from tests.waiting import wait_for

QUESTIONS = (
    "Write a long story about a brave knight and a dragon.",
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how bread is made, step by step.",
    "Describe a long journey across a desert on a camel.",
)
STREAMS = 8
MAX_TOKENS = 64
MOVE_AFTER_CHUNKS = 4  # every stream is this far into its generation when its node leaves
WAIT_S = 120.0  # generous: the 2-core CI machine runs other tests' processes too


def streams_moved_when(
    url: str,
    active_sessions: Callable[[], int],
    leaving: str,
    move: Callable[[], None],
    reference: Callable[[str, int], list[int]],
) -> list[dict[str, Any]]:
    """Run 8 greedy streams that all go through node `leaving` (`active_sessions`: its open sessions); call
    `move` once each is under way; check the tokens of every one against a single-process run; return their
    "coop" extras."""
    progress = [0] * STREAMS
    chunk_times: list[list[float]] = [[] for _ in range(STREAMS)]

    def run(index: int) -> dict[str, Any]:
        final: dict[str, Any] = {}
        for chunk in stream_greedy_chat(url, QUESTIONS[index % len(QUESTIONS)], MAX_TOKENS):
            progress[index] += 1
            chunk_times[index].append(time.monotonic())
            final = chunk.get("coop") or final
        return final

    with ThreadPoolExecutor(STREAMS) as workers:
        streams = [workers.submit(run, i) for i in range(STREAMS)]
        wait_for("every stream under way", lambda: min(progress) >= MOVE_AFTER_CHUNKS, WAIT_S)
        assert active_sessions() == STREAMS  # the leaving node carries all 8
        moved_at = time.monotonic()
        move()
        extras = [stream.result(timeout=WAIT_S) for stream in streams]  # raises if any request failed
    finished_s = time.monotonic() - moved_at
    gaps = [max(b - a for a, b in itertools.pairwise(times) if b > moved_at) for times in chunk_times]
    print(f"{STREAMS} streams finished {finished_s:.1f}s after {leaving} began to leave; longest pause between")
    print(f"tokens after it: {max(gaps):.2f}s (median stream {sorted(gaps)[STREAMS // 2]:.2f}s)")
    for index, coop in enumerate(extras):
        assert coop["token_ids"] == reference(QUESTIONS[index % len(QUESTIONS)], MAX_TOKENS)
        assert coop["route"][0]["failovers"] == 0  # a planned move, not a failure
        assert leaving not in {hop["node_id"] for hop in coop["route"]}
    return extras
