"""Multi-token steps through real nodes: the tokens of a single-process run, in fewer steps, through failover."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from coop.launcher import LocalPool as Pool
from coop.node.client import node_info
from tests.chat_requests import answered_chat, stream_greedy_chat

pytestmark = pytest.mark.slow

PARAGRAPH = (
    "The river rises in the hills above the town, runs past the old mill and the school, and reaches the sea "
    "after forty miles of farmland. In spring it floods the lower fields; in summer children swim in its slow "
    "brown pools."
)
REPEAT = f"Repeat this paragraph exactly, word for word:\n\n{PARAGRAPH}"
OPEN_ENDED = "Write a short story about a lighthouse keeper."
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def pool(demo_model_dir: str) -> Iterator[Pool]:
    """The coordinator runs with its default, speculative_tokens = 4; blocks 10:20 have a replica."""
    pool = Pool(demo_model_dir)
    try:
        pool.start_dht()
        pool.start_nodes({"node-a": "0:10", "node-b1": "10:20", "node-b2": "10:20", "node-c": "20:30"})
        pool.start_coordinator()
        yield pool
    finally:
        pool.stop()


def _steps_run(pool: Pool, name: str) -> int:
    return node_info(pool.nodes[name].ready["endpoint"]).counters.steps_run


@pytest.mark.parametrize("question", [REPEAT, OPEN_ENDED], ids=["repetition", "open-ended"])
def test_multi_token_steps_give_the_single_process_tokens(
    pool: Pool, reference: Callable[[str, int], list[int]], question: str
) -> None:
    before = _steps_run(pool, "node-a")
    answer = answered_chat(pool.url, None, question, MAX_TOKENS)
    steps = _steps_run(pool, "node-a") - before
    tokens = answer["coop"]["token_ids"]
    assert tokens == reference(question, MAX_TOKENS)
    assert steps <= len(tokens)  # one-token steps take exactly len(tokens): the prompt, then one per token
    if question == REPEAT:
        assert steps < len(tokens) / 2, f"{steps} steps for {len(tokens)} tokens: drafts were not accepted"
    print(f"{question[:20]!r}: {len(tokens)} tokens in {steps} steps")


def test_kill_9_during_multi_token_steps_gives_the_same_tokens(
    pool: Pool, reference: Callable[[str, int], list[int]]
) -> None:
    killed = ""
    final: dict[str, object] = {}
    for chunks, chunk in enumerate(stream_greedy_chat(pool.url, REPEAT, MAX_TOKENS), start=1):
        if chunk.get("coop"):
            final = chunk
        if chunks == 3 and not killed:
            busy = [n for n in ("node-b1", "node-b2") if node_info(pool.nodes[n].ready["endpoint"]).active_sessions]
            assert len(busy) == 1, busy
            killed = busy[0]
            pool.nodes[killed].kill_hard()
    assert killed, "the generation ended before a node could be killed"
    coop = final["coop"]
    assert isinstance(coop, dict)
    assert coop["token_ids"] == reference(REPEAT, MAX_TOKENS)
    assert [hop["node_id"] for hop in coop["route"]][1] != killed
    assert coop["route"][0]["failovers"] == 1
