"""Graceful drain and owner reclaim with real processes: a node carrying 8 greedy streams is paused, then
another is drained; the streams move to the other node of the span with no error and the same tokens.

One pool of member nodes (mutual TLS, signed announcements): edges of beta, the two nodes of the middle
span of alpha, which alone may pause, resume and drain them (`coop node pause|resume|drain`).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from coop.launcher import COOP, LocalPool
from coop.node.client import node_control, node_info
from coop.pool.membership import Membership
from coop.wire.generated import coop_pb2 as pb
from tests.moving_streams import WAIT_S, streams_moved_when
from tests.pools import make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

MIDDLE = {"mid-1": "10:20", "mid-2": "10:20"}


@dataclass
class DrainPool:
    pool: LocalPool
    bundles: dict[str, Path]
    observer: Membership = field(init=False)

    def __post_init__(self) -> None:
        self.observer = Membership.load(self.bundles["alpha"], node_id=f"observer-{uuid.uuid4().hex[:8]}")

    def control(self, action: str, node: str, as_member: str = "alpha") -> subprocess.CompletedProcess[str]:
        """`coop node ACTION` of `node`, run as the CLI of `as_member` (whose certificate it presents)."""
        endpoint = self.pool.nodes[node].ready["endpoint"]
        args = ["node", action, endpoint, "--member", str(self.bundles[as_member]), "--node-id", node]
        args += ["--institution", "alpha"]  # the node's, which it proves in TLS
        return subprocess.run([*COOP, *args], capture_output=True, text=True, timeout=WAIT_S, check=False)

    def info(self, node: str) -> Any:
        endpoint = self.pool.nodes[node].ready["endpoint"]
        return node_info(endpoint, self.observer.channel_security(), institution="alpha", node_id=node)

    def states_in_status(self) -> dict[str, str]:
        """Each node's state as `coop status` shows it (from the signed announcements in the DHT)."""
        args = ["status", "--model", str(self.pool.model_dir), "--initial-peers", self.pool.peer]
        args += ["--member", str(self.bundles["alpha"])]
        env = os.environ | {"COLUMNS": "200"}  # a table as wide as it needs, not cut to 80 columns
        shown = subprocess.run([*COOP, *args], capture_output=True, text=True, timeout=WAIT_S, check=True, env=env)
        cells = [[c.strip() for c in line.split("│")] for line in shown.stdout.splitlines() if line.count("│") > 3]
        return {row[1]: row[4] for row in cells if row[1] in self.pool.nodes}

    def streams_moved_when(
        self, leaving: str, move: Callable[[], None], reference: Callable[[str, int], list[int]]
    ) -> list[dict[str, Any]]:
        return streams_moved_when(self.pool.url, lambda: self.info(leaving).active_sessions, leaving, move, reference)

    def act(self, action: pb.ControlRequest.Action, node: str) -> str:
        """The same call as `control`, in this process: quick enough to hand over streams mid-generation."""
        endpoint = self.pool.nodes[node].ready["endpoint"]
        security = self.observer.channel_security()
        return node_control(endpoint, action, security, institution="alpha", node_id=node).state


@pytest.fixture(scope="module")
def pool(demo_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DrainPool]:
    pool_dir = tmp_path_factory.mktemp("drain") / "pool"
    disk = make_pool(pool_dir, "Drain pool", ("alpha", "beta"), coordinators=("coord",))
    bundles, coordinator = disk.bundles, disk.bundles["coord"]
    pool = LocalPool(demo_model_dir)
    try:
        pool.start_dht(bundles["beta"])
        members = {"edge-a": bundles["beta"], "edge-c": bundles["beta"]} | dict.fromkeys(MIDDLE, bundles["alpha"])
        spans = {"edge-a": "0:10", **MIDDLE, "edge-c": "20:30"}
        pool.start_nodes(spans, members, extra_args=["--drain-deadline-s", str(WAIT_S)])
        with pytest.MonkeyPatch.context() as patch:
            # the swarm view would notice a paused node within a second too: re-read so rarely here, the
            # moves can only come from the nodes' `draining` events (the view is refreshed when no route is found)
            patch.setenv("COOP_COORDINATOR_REFRESH_S", "600")
            pool.start_coordinator(member=coordinator)
        yield DrainPool(pool, bundles)
    finally:
        pool.stop()


def test_only_the_nodes_institution_may_pause_it(pool: DrainPool) -> None:
    refused = pool.control("pause", "mid-1", as_member="beta")
    assert refused.returncode != 0
    assert "only the node's own institution 'alpha' may control it" in refused.stdout + refused.stderr
    assert pool.info("mid-1").state == "serving"


def test_a_paused_node_hands_its_streams_over_and_stays_up(
    pool: DrainPool, reference: Callable[[str, int], list[int]]
) -> None:
    assert "paused" in pool.control("pause", "mid-2").stdout  # so that every stream goes through mid-1

    def hand_over() -> None:
        assert pool.act(pb.ControlRequest.RESUME, "mid-2") == "serving"  # back into routes
        assert pool.act(pb.ControlRequest.PAUSE, "mid-1") == "paused"

    extras = pool.streams_moved_when("mid-1", hand_over, reference)
    assert all(hop["node_id"] == "mid-2" for coop in extras for hop in coop["route"] if hop["start"] == 10)
    assert pool.pool.nodes["mid-1"].alive
    wait_for("the paused node to hold no session", lambda: pool.info("mid-1").active_sessions == 0, WAIT_S)
    assert pool.info("mid-1").state == "paused"
    wait_for("coop status to show the pause", lambda: pool.states_in_status()["mid-1"] == "paused", WAIT_S)
    assert pool.states_in_status()["mid-2"] == "serving"


def test_a_drained_node_hands_its_streams_over_and_exits(
    pool: DrainPool, reference: Callable[[str, int], list[int]]
) -> None:
    node = pool.pool.nodes["mid-2"]  # mid-1 is still paused: every stream goes through mid-2

    def drain() -> None:
        assert pool.act(pb.ControlRequest.RESUME, "mid-1") == "serving"
        assert pool.act(pb.ControlRequest.DRAIN, "mid-2") == "draining"

    pool.streams_moved_when("mid-2", drain, reference)
    assert node.popen.wait(timeout=WAIT_S) == 0
    assert any("drained: no session left" in line for line in node.lines)
