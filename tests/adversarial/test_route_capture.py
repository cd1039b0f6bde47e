"""Attack 5, route capture: a node announces the whole model at 1e12 tokens/s to take every route.

Pool: honest "head" 0:15 and "tail" 15:30, honest "whole" 0:30, and "liar" 0:30, which runs
Coop's node but claims 1e12 tokens/s while being slower than the others (`lying_node`). Before
this defence, the coordinator priced the liar's compute at 1e-12 s a token and sent it every
request of an idle pool. Now it believes no claim faster than what it has measured, prices a
node it has measured by what it did, and counts every route it chose as load on its nodes: a
burst of concurrent chats spreads over the honest nodes too, and once the liar has been measured
an idle pool routes around it. Every answer equals the single-process reference throughout.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from coop import launcher
from coop.launcher import LocalPool
from coop.node.client import node_info
from tests.adversarial.lying_node import CLAIMED_TPS

pytestmark = pytest.mark.slow

HONEST = {"head": "0:15", "tail": "15:30", "whole": "0:30"}
QUESTIONS = ["What is the capital of France?", "Name a colour.", "What is 2+2?", "Say hello."]
BURST = 12
IDLE = 4
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def pool(demo_model_dir: str) -> Iterator[LocalPool]:
    pool = LocalPool(demo_model_dir)
    try:
        pool.start_dht()
        pool.start_nodes(HONEST)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(launcher, "COOP", [sys.executable, "-m", "tests.adversarial.lying_node"])
            pool.start_nodes({"liar": "0:30"})
        pool.start_coordinator()
        yield pool
    finally:
        pool.stop()


def _chat(url: str, question: str, reference: Callable[[str, int], list[int]]) -> list[str]:
    """The route of one greedy chat, after checking its answer against the reference."""
    body = {
        "model": "smollm2-demo",
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    coop = response.json()["coop"]
    assert coop["token_ids"] == reference(question, MAX_TOKENS)
    return [hop["node_id"] for hop in coop["route"]]


def _steps_run(pool: LocalPool) -> dict[str, int]:
    return {name: node_info(pool.nodes[name].ready["endpoint"]).counters.steps_run for name in HONEST}


def test_a_claim_of_1e12_tokens_per_second_captures_no_routes(
    pool: LocalPool, reference: Callable[[str, int], list[int]]
) -> None:
    liar = node_info(pool.nodes["liar"].ready["endpoint"])
    assert liar.throughput_tps == CLAIMED_TPS and (liar.start, liar.end) == (0, 30)  # the lie is told
    for question in QUESTIONS:
        reference(question, MAX_TOKENS)  # computed before the burst, not while it runs
    steps_before = _steps_run(pool)

    with ThreadPoolExecutor(max_workers=BURST) as threads:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(BURST)]
        burst = list(threads.map(lambda question: _chat(pool.url, question, reference), questions))
    # Never measured, the liar is priced like the median claim, so the first request tries it;
    # the routes chosen since count as load, so the others spread over the honest nodes.
    assert 1 <= sum("liar" in route for route in burst) < BURST, burst
    served = {name for name, steps in _steps_run(pool).items() if steps > steps_before[name]}
    assert served == {node_id for route in burst for node_id in route} - {"liar"}, burst

    idle = [_chat(pool.url, QUESTIONS[i % len(QUESTIONS)], reference) for i in range(IDLE)]
    # Measured now, the liar is priced by what it did: an idle pool does not give it every request.
    assert sum("liar" in route for route in idle) < IDLE, idle
