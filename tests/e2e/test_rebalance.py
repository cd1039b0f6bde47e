"""Rebalancing with real processes: a node started with `--blocks auto` and two models stays put in a
balanced pool, moves (drained first) to the other model when that one loses its only node, with 8 greedy
streams handed over without an error and with the same tokens, and moves back to cover a gap of the
demo model when a node of it is killed.

One pool (development mode): a and b pinned to the two halves of the demo model, m2 pinned to a tiny
second model, and c, which may serve half of either model and rebalances every second.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coop.config import DEFAULT_POOL_ID, NodeSettings
from coop.launcher import CoopProcess, LocalPool, start
from coop.model.manifest import Manifest
from coop.node.client import node_control, node_info
from coop.node.daemon import estimate_throughput
from coop.node.rebalancing import MOVED_MARKER, ServableModel, candidates
from coop.swarm.announcement import NodeAnnouncement
from coop.swarm.directory import SwarmDirectory
from coop.swarm.rebalance import Placement, decide
from coop.wire.generated import coop_pb2 as pb
from tests.chat_requests import greedy_chat
from tests.moving_streams import WAIT_S, streams_moved_when
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

HALF = 15  # the demo model has 30 blocks
REBALANCE_INTERVAL_S = 1.0
ALL_NODES = ("a", "b", "c", "m2")


@dataclass
class RebalancePool:
    pool: LocalPool
    demo_hash: str
    tiny_hash: str

    def node(self, name: str) -> CoopProcess:
        return self.pool.nodes[name]

    def info(self, name: str) -> pb.NodeInfo:
        return node_info(self.node(name).ready["endpoint"])

    def control(self, name: str, action: pb.ControlRequest.Action) -> str:
        return node_control(f"unix:{self.node(name).ready['control_socket']}", action).state

    def place(self, name: str) -> tuple[str, int, int]:
        info = self.info(name)
        return info.model_hash, info.start, info.end

    def moves(self, name: str) -> int:
        return sum(line.startswith(MOVED_MARKER) for line in self.node(name).lines)


def _start_node(pool: LocalPool, name: str, args: list[str]) -> CoopProcess:
    """A node with its own --model flags (LocalPool's serve its one model); wait for it with `wait_ready`."""
    node = start(
        name, ["node", "start", *args, "--initial-peers", pool.peer, "--node-id", name, "--device", "cpu"], None
    )
    pool.processes.append(node)
    pool.nodes[name] = node
    return node


@pytest.fixture(scope="module")
def pool(demo_model_dir: str, tiny_llama_dir: str) -> Iterator[RebalancePool]:
    pool = LocalPool(demo_model_dir)
    try:
        pool.start_dht()
        tiny = _start_node(pool, "m2", ["--model", tiny_llama_dir, "--blocks", "0:6"])
        pool.start_nodes({"a": f"0:{HALF}", "b": f"{HALF}:30"})
        tiny.wait_ready("COOP_NODE_READY")
        rebalancing = ["--rebalance-interval-s", str(REBALANCE_INTERVAL_S), "--rebalance-dwell-s", "2"]
        models = ["--model", demo_model_dir, "--model", tiny_llama_dir]
        # c starts once the others are announced: it takes its place from what they serve
        c = _start_node(pool, "c", [*models, "--blocks", "auto", "--max-blocks", str(HALF), *rebalancing])
        with pytest.MonkeyPatch.context() as patch:  # spot checks would open shadow sessions on other nodes
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_RATE", "0")
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_NEW_NODE_RATE", "0")
            pool.start_coordinator()
        c.wait_ready("COOP_NODE_READY")
        yield RebalancePool(
            pool, Manifest.load(demo_model_dir).content_hash, Manifest.load(tiny_llama_dir).content_hash
        )
    finally:
        pool.stop()


def test_in_a_balanced_pool_nothing_moves(pool: RebalancePool, demo_model_dir: str, tiny_llama_dir: str) -> None:
    # c doubles a half of the demo model: moving to the other half, or to the covered tiny model, gains nothing
    assert pool.place("c") == (pool.demo_hash, 0, HALF)
    here = Placement(*pool.place("c"))
    models = {
        manifest.content_hash: ServableModel(Path(path), manifest, min(HALF, manifest.num_blocks))
        for path in (demo_model_dir, tiny_llama_dir)
        if (manifest := Manifest.load(path))
    }
    # c's own rule over the directory it reads, once every node is announced: it decides to stay
    directory = SwarmDirectory.start([pool.pool.peer], timeout_s=WAIT_S)  # two busy test workers: a slow p2pd start
    try:

        def every_node_announced() -> dict[str, list[NodeAnnouncement]] | None:
            live = {h: directory.list_nodes(DEFAULT_POOL_ID, h) for h in models}
            return live if sum(map(len, live.values())) == len(ALL_NODES) else None

        live = wait_for("every node's announcement", every_node_announced, WAIT_S)
    finally:
        directory.shutdown()
    mine = candidates(models, here, pool.info("c").throughput_tps, lambda m, a, b: estimate_throughput(m, a, b, "cpu"))
    assert decide("c", here, mine, live, threshold=NodeSettings.model_fields["rebalance_threshold"].default) is None
    assert pool.moves("c") == 0


def test_a_move_hands_8_streams_over_with_the_same_tokens(
    pool: RebalancePool, reference: Callable[[str, int], list[int]]
) -> None:
    assert pool.control("a", pb.ControlRequest.PAUSE) == "paused"  # so that every stream goes through c

    def open_a_gap_in_the_tiny_model() -> None:
        assert pool.control("a", pb.ControlRequest.RESUME) == "serving"  # where c's streams can go
        pool.node("m2").stop()  # drains (nothing to move) and withdraws: the tiny model has no node left

    streams_moved_when(
        pool.pool.url, lambda: pool.info("c").active_sessions, "c", open_a_gap_in_the_tiny_model, reference
    )
    wait_for("c to serve the tiny model", lambda: pool.place("c") == (pool.tiny_hash, 0, 6), WAIT_S)
    assert pool.moves("c") == 1
    assert pool.info("c").state == "serving"


def test_a_node_moves_to_cover_the_gap_a_killed_node_left(pool: RebalancePool) -> None:
    pool.node("b").kill_hard()  # its record lapses within the announcement TTL
    killed_at = time.monotonic()
    wait_for("c to cover the killed node's blocks", lambda: pool.place("c") == (pool.demo_hash, HALF, 30), WAIT_S)
    print(f"c covered blocks {HALF}:30 {time.monotonic() - killed_at:.1f}s after b was killed")
    answered = wait_for(
        "a chat answered again",
        lambda: (response := greedy_chat(pool.pool.url, None, "Say hello.", 8)).status_code == 200 and response,
        WAIT_S,
        every_s=1.0,
    )
    assert answered.json()["choices"][0]["message"]["content"]
