"""Attack 6: a member's modified node rewinds the next hop's KV cache on every step.

Pool "rewind" (the tiny chat model, 4 blocks): Uni A's "head" serves blocks 0:2 and Uni B's "tail"
2:4; Mallory runs Coop's node modified (`rewinding_node`) over 0:2 with her valid member bundle. It
computes honestly but pushes every step onward as a rewind nobody asked for, with a coordinator
signature replayed from the route. Before this defence the tail dropped its cache back and recomputed
unpaid, slower, and was blamed for it. Now the tail refuses such a step before running anything (the
rewind is not within its latest step's drafts, or not signed for this rewind by the session's
coordinator), Mallory's report of that refusal only moves the session off Mallory, and the tail keeps
its place in routes and its full pay: no receipt of an honest node is capped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from coop import launcher
from coop.launcher import LocalPool
from coop.ledger.store import Ledger
from coop.node.client import node_info
from coop.pool.bundle import MemberBundle
from coop.wire.channels import ChannelSecurity
from coop.wire.generated import coop_pb2 as pb
from tests.chat_requests import answered_chat
from tests.pools import PoolOnDisk, make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a colour.", "What is 2+2?", "Say hello."]
MAX_TOKENS = 6
BURST = 4
HONEST = {"head": ("0:2", "Uni A"), "tail": ("2:4", "Uni B")}
REWINDER = "rewinder"
WAIT_S = 60.0


@dataclass
class RewindPool:
    pool: LocalPool
    disk: PoolOnDisk
    ledger: Ledger

    def chat(self, question: str, reference: Callable[[str, int], list[int]]) -> list[str]:
        """The route of one greedy chat, after checking its answer against the reference."""
        coop = answered_chat(self.pool.url, self.disk.keys["Client"], question, MAX_TOKENS, timeout_s=300)["coop"]
        assert coop["token_ids"] == reference(question, MAX_TOKENS), question
        return [hop["node_id"] for hop in coop["route"]]

    def online(self) -> set[str]:
        """The nodes the coordinator's swarm view routes to now: suspects are not among them."""
        headers = {"Authorization": f"Bearer {self.disk.admin_token}"}
        nodes = httpx.get(f"{self.pool.url}/admin/api/nodes", headers=headers, timeout=30).raise_for_status().json()
        return {node["node_id"] for node in nodes if node["online"]}

    def info(self, name: str) -> pb.NodeInfo:
        credentials = MemberBundle.load(self.disk.bundles["Coord"]).credentials()
        security = ChannelSecurity(credentials.channel_credentials(), credentials.node_tls_name)
        ready = self.pool.nodes[name].ready
        return node_info(ready["endpoint"], security, institution=ready["institution"], node_id=name)


@pytest.fixture
def rewind_pool(tiny_chat_model_dir: str, tmp_path: Path) -> Iterator[RewindPool]:
    disk = make_pool(tmp_path / "pool", "Rewind", ("Uni A", "Uni B", "Mallory", "Client"), ("Coord",), ("Client",))
    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht(member=disk.bundles["Coord"])
        pool.start_nodes(
            {n: span for n, (span, _) in HONEST.items()}, {n: disk.bundles[i] for n, (_, i) in HONEST.items()}
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(launcher, "COOP", [sys.executable, "-m", "tests.adversarial.rewinding_node"])
            pool.start_nodes({REWINDER: "0:2"}, {REWINDER: disk.bundles["Mallory"]})
        with pytest.MonkeyPatch.context() as patch:  # spot checks would run steps on nodes off the routes
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_RATE", "0")
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_NEW_NODE_RATE", "0")
            disk.start_coordinator(pool, "Coord", ["--receipt-interval-s", "0.3"])
        rewind_pool = RewindPool(pool, disk, disk.ledger())
        everyone = {*HONEST, REWINDER}
        wait_for("the coordinator to list every node", lambda: rewind_pool.online() >= everyone, timeout_s=120)
        yield rewind_pool
        rewind_pool.ledger.close()
    finally:
        pool.stop()


def test_a_node_that_rewinds_its_next_hop_gets_refusals_and_the_next_hop_keeps_its_place_and_pay(
    rewind_pool: RewindPool, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    pool = rewind_pool
    for question in QUESTIONS:
        tiny_reference(question, MAX_TOKENS)  # computed before the burst, not while it runs
    with ThreadPoolExecutor(BURST) as threads:
        routes = list(threads.map(lambda q: pool.chat(q, tiny_reference), QUESTIONS[:BURST]))
    routes += [pool.chat(q, tiny_reference) for q in QUESTIONS[:2]]

    refused = pool.info("tail").counters.limited["rewind"]
    assert refused > 0, "the tail was never sent a rewind: the attack did not happen"
    print(f"rewinds the tail refused: {refused}; routes: {routes}")
    assert pool.info("tail").counters.steps_run > 0
    assert all(route == ["head", "tail"] for route in routes), routes
    assert pool.online() >= set(HONEST)  # the refusing tail, alive, is still routed to
    suspected = [line for line in pool.pool.processes[-1].lines if "suspecting node" in line]
    assert not [line for line in suspected if "node tail " in line or "node head " in line], suspected

    def honest_receipts() -> set[str] | None:
        """Receipts of the honest nodes, once the tail's cover every answered chat."""
        receipts = pool.ledger.receipts()
        if len({r.session_id for r in receipts if r.node_id == "tail"}) < len(routes):
            return None
        return {r.receipt_id for r in receipts if r.node_id in HONEST}

    booked = wait_for("the tail's receipts of every answered chat", honest_receipts, WAIT_S)
    capped = [e for e in pool.ledger.audit_events(action="receipt_capped") if e.subject in booked]
    assert capped == [], capped
