"""Attack 5: an API key holder pins a node's KV cache with idle SDK relay sessions.

Pool "pin" (the tiny chat model, context 512): Host's "host-1" serves every block with a KV cache
budget of `CACHE_BUDGET_MB`, which a few sessions of the whole context fill. Uni A's key holder runs
the SDK (`RemoteModel`) and opens as many relay sessions of the whole context as the pool lets it,
each with one 1-token step, then leaves them idle; before every chat of Uni B it tries again, to
take back whatever room Uni B's last chat freed. Before this defence the node refused the next open
with a cache-limit error that the coordinator took for a dead node, suspected for 30 s: Uni B got 2
of 23 requests answered. Now the cache is shared per consuming institution, so Uni B, below its
share, takes the room of Uni A's idle sessions (closed by the node), and a cache refusal is a
capacity refusal: the node is never suspected, and only Uni A is refused or evicted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from coop.client import ApiError, InferenceSession, RemoteModel
from coop.launcher import LocalPool
from coop.node.client import node_info
from coop.pool.bundle import MemberBundle
from coop.wire.channels import ChannelSecurity
from coop.wire.generated import coop_pb2 as pb
from tests.chat_requests import answered_chat
from tests.pools import PoolOnDisk, make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a colour.", "What is 2+2?"]
MAX_TOKENS = 6
CACHE_BUDGET_MB = 1
CONTEXT = 512  # the tiny chat model's max_position_embeddings: the longest session the relay opens
MAX_OPENS = 8  # the pool's max_concurrent_requests_per_key: one key holds no more
NODE = "host-1"


@dataclass
class Pinner:
    """Uni A's SDK, holding every relay session it could open, and the refusals it got."""

    model: RemoteModel
    sessions: list[InferenceSession] = field(default_factory=list)
    refusals: list[ApiError] = field(default_factory=list)

    def pin(self) -> None:
        """Open idle sessions of the whole context, one 1-token step each, until one is refused."""
        while len(self.sessions) < MAX_OPENS:
            try:
                session = self.model.inference_session(max_length=CONTEXT)
                session.step(self.model.embed([1]), token_ids=[1])
            except ApiError as exc:
                self.refusals.append(exc)
                return
            self.sessions.append(session)


@dataclass
class PinPool:
    pool: LocalPool
    disk: PoolOnDisk

    def online(self) -> set[str]:
        """The nodes the coordinator's swarm view routes to now: suspects are not among them."""
        headers = {"Authorization": f"Bearer {self.disk.admin_token}"}
        nodes = httpx.get(f"{self.pool.url}/admin/api/nodes", headers=headers, timeout=30).raise_for_status().json()
        return {node["node_id"] for node in nodes if node["online"]}

    def info(self) -> pb.NodeInfo:
        credentials = MemberBundle.load(self.disk.bundles["Coord"]).credentials()
        security = ChannelSecurity(credentials.channel_credentials(), credentials.node_tls_name)
        ready = self.pool.nodes[NODE].ready
        return node_info(ready["endpoint"], security, institution=ready["institution"], node_id=NODE)

    def suspicions(self) -> list[str]:
        return [line for line in self.pool.processes[-1].lines if "suspecting node" in line]


@pytest.fixture
def pin_pool(tiny_chat_model_dir: str, tmp_path: Path) -> Iterator[PinPool]:
    disk = make_pool(tmp_path / "pool", "Pin", ("Host", "Uni A", "Uni B"), ("Coord",), ("Uni A", "Uni B"))
    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht(member=disk.bundles["Coord"])
        pool.start_nodes({NODE: "0:4"}, {NODE: disk.bundles["Host"]}, ["--cache-budget-mb", str(CACHE_BUDGET_MB)])
        disk.start_coordinator(pool, "Coord")
        pin_pool = PinPool(pool, disk)
        wait_for("the coordinator to list the node", lambda: NODE in pin_pool.online(), timeout_s=120)
        yield pin_pool
    finally:
        pool.stop()


def test_idle_relay_sessions_cannot_pin_a_nodes_cache_or_get_it_suspected(
    pin_pool: PinPool, tiny_chat_model_dir: str, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    pool = pin_pool
    with RemoteModel.from_pretrained(tiny_chat_model_dir, pool.pool.url, api_key=pool.disk.keys["Uni A"]) as model:
        pinner = Pinner(model)
        pinner.pin()
        assert pinner.refusals, "every open was taken: the node's cache was never full"
        assert pool.info().free_cache_bytes == 0  # pinned whole: the attack happened
        for question in QUESTIONS:
            pinner.pin()  # re-triggered: whatever room Uni B's last chat freed
            answer = answered_chat(pool.pool.url, pool.disk.keys["Uni B"], question, MAX_TOKENS, timeout_s=300)
            assert answer["coop"]["token_ids"] == tiny_reference(question, MAX_TOKENS), question
        evicted = pool.info().counters.limited["cache_share"]
        assert evicted > 0, "Uni B never took room from Uni A's idle sessions"
        # Uni A's sessions the node closed end for Uni A, and only for it: its next step is refused.
        ended = []
        for session in pinner.sessions:
            try:
                session.step(model.embed([2]), token_ids=[2])
            except ApiError as exc:
                ended.append(exc)
        print(f"Uni A: {len(pinner.sessions)} sessions, refused {len(pinner.refusals)} opens, {len(ended)} ended")
        assert len(ended) >= evicted and all(exc.status == 503 for exc in ended + pinner.refusals)
    assert NODE in pool.online()  # never suspected: neither for refusing Uni A, nor for dropping its sessions
    assert pool.suspicions() == []
