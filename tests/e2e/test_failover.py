"""Fault tolerance and multi-token steps through one pool of real nodes (blocks 10:20 have three replicas).

Multi-token steps give the tokens of a single-process run in fewer steps, also through a failover; kill -9 of
a node mid-generation, dead nodes leaving routes, missing blocks, SIGTERM.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from coop.launcher import LocalPool as Pool
from coop.model.manifest import Manifest
from coop.node.client import node_info
from coop.swarm.directory import SwarmDirectory
from tests.chat_requests import answered_chat, stream_greedy_chat
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

STORY = "Write a long story about a brave knight and a dragon."
MAX_TOKENS = 40
PARAGRAPH = (
    "The river rises in the hills above the town, runs past the old mill and the school, and reaches the sea "
    "after forty miles of farmland. In spring it floods the lower fields; in summer children swim in its slow "
    "brown pools."
)
REPEAT = f"Repeat this paragraph exactly, word for word:\n\n{PARAGRAPH}"
OPEN_ENDED = "Write a short story about a lighthouse keeper."
SPECULATIVE_TOKENS = 48
REPLICAS = ("node-b1", "node-b2", "node-b3")
DEAD_NODE_BOUND_S = 12.0  # expected: announcement TTL 9 s + one DHT refresh (printed, not asserted)
WAIT_S = 60.0  # generous deadlines: the 2-core CI machine runs other tests' processes too


@pytest.fixture(scope="module")
def pool(demo_model_dir: str) -> Iterator[Pool]:
    """The coordinator runs with its default, speculative_tokens = 4, and without spot checks."""
    pool = Pool(demo_model_dir)
    try:
        pool.start_dht()
        pool.start_nodes({"node-a": "0:10", **{name: "10:20" for name in REPLICAS}, "node-c": "20:30"})
        with pytest.MonkeyPatch.context() as patch:  # spot checks would open shadow sessions on the replicas
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_RATE", "0")
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_NEW_NODE_RATE", "0")
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
    answer = answered_chat(pool.url, None, question, SPECULATIVE_TOKENS)
    steps = _steps_run(pool, "node-a") - before
    tokens = answer["coop"]["token_ids"]
    assert tokens == reference(question, SPECULATIVE_TOKENS)
    assert steps <= len(tokens)  # one-token steps take exactly len(tokens): the prompt, then one per token
    if question == REPEAT:
        assert steps < len(tokens) / 2, f"{steps} steps for {len(tokens)} tokens: drafts were not accepted"
    print(f"{question[:20]!r}: {len(tokens)} tokens in {steps} steps")


def test_kill_9_during_multi_token_steps_gives_the_same_tokens(
    pool: Pool, reference: Callable[[str, int], list[int]]
) -> None:
    killed = ""
    final: dict[str, object] = {}
    for chunks, chunk in enumerate(stream_greedy_chat(pool.url, REPEAT, SPECULATIVE_TOKENS), start=1):
        if chunk.get("coop"):
            final = chunk
        if chunks == 3 and not killed:
            busy = [n for n in _alive(pool, REPLICAS) if node_info(pool.nodes[n].ready["endpoint"]).active_sessions]
            assert len(busy) == 1, busy
            killed = busy[0]
            pool.nodes[killed].kill_hard()
    assert killed, "the generation ended before a node could be killed"
    coop = final["coop"]
    assert isinstance(coop, dict)
    assert coop["token_ids"] == reference(REPEAT, SPECULATIVE_TOKENS)
    assert [hop["node_id"] for hop in coop["route"]][1] != killed
    assert coop["route"][0]["failovers"] == 1


def _alive(pool: Pool, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if pool.nodes[name].popen.poll() is None]


def test_kill_9_mid_generation_gives_the_same_tokens(
    pool: Pool, reference: Callable[[str, int], list[int]], demo_model_dir: str
) -> None:
    chunk_times: list[float] = []
    killed = ""
    final: dict[str, object] = {}
    killed_at = 0.0
    for chunk in stream_greedy_chat(pool.url, STORY, MAX_TOKENS):
        chunk_times.append(time.monotonic())
        if chunk.get("coop"):
            final = chunk
        if len(chunk_times) == 6 and not killed:
            busy = [n for n in _alive(pool, REPLICAS) if node_info(pool.nodes[n].ready["endpoint"]).active_sessions]
            assert len(busy) == 1, busy
            killed = busy[0]
            pool.nodes[killed].kill_hard()
            killed_at = time.monotonic()
    assert killed, "the generation ended before a node could be killed"
    coop = final["coop"]
    assert isinstance(coop, dict)
    assert coop["token_ids"] == reference(STORY, MAX_TOKENS)
    assert [hop["node_id"] for hop in coop["route"]][1] != killed
    assert coop["route"][0]["failovers"] == 1
    after = [t for t in chunk_times if t > killed_at]
    pause = after[0] - killed_at if after else 0.0
    print(f"failover pause after kill -9: {pause:.2f}s")

    # the dead node leaves the directory once its announcement lapses
    manifest = Manifest.load(demo_model_dir)
    directory = SwarmDirectory.start([pool.peer])
    try:
        wait_for(
            f"the dead {killed} to leave the directory",
            lambda: killed not in {n.node_id for n in directory.list_nodes("default", manifest.content_hash)},
            WAIT_S,
            every_s=0.5,
        )
        gone_after = time.monotonic() - killed_at
    finally:
        directory.shutdown()
    print(f"dead node left the directory after {gone_after:.1f}s (expected within {DEAD_NODE_BOUND_S:.0f}s)")


def test_missing_blocks_give_503_naming_them(pool: Pool) -> None:
    for name in _alive(pool, REPLICAS):
        pool.nodes[name].kill_hard()
    body = {"model": "smollm2-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def refused() -> httpx.Response | None:
        response = httpx.post(f"{pool.url}/v1/chat/completions", json=body, timeout=120)
        return response if response.status_code == 503 else None

    response = wait_for("a 503 once no node serves blocks 10:20", refused, WAIT_S)
    assert "10:20" in response.json()["error"]["message"]


def test_sigterm_withdraws_at_once_and_exits_cleanly(pool: Pool, demo_model_dir: str) -> None:
    node = pool.nodes["node-c"]
    manifest = Manifest.load(demo_model_dir)
    directory = SwarmDirectory.start([pool.peer])
    try:
        assert "node-c" in {n.node_id for n in directory.list_nodes("default", manifest.content_hash)}
        started = time.monotonic()
        node.popen.send_signal(signal.SIGTERM)
        assert node.popen.wait(timeout=WAIT_S) == 0
        exited_after = time.monotonic() - started
        listed = {n.node_id for n in directory.list_nodes("default", manifest.content_hash)}
    finally:
        directory.shutdown()
    print(f"node exited {exited_after:.1f}s after SIGTERM")
    assert "node-c" not in listed  # withdrawn, not left to expire
