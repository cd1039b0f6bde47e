"""Receipt collection against fake nodes and a real ledger: slow nodes hold no one up, junk is cheap to refuse.

The nodes are fakes of the two gRPC calls the collector makes (`Receipts`, `AckReceipts`); the
checks, the bookings and the audit events are the real ones, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import event

from coop.admin import AdminContext, mount_admin
from coop.coordinator.accounts.observations import Metering
from coop.coordinator.accounts.receipt_collection import ReceiptCollector
from coop.ledger.fairshare import FairShare
from coop.ledger.store import Ledger
from coop.swarm.announcement import NodeAnnouncement
from coop.swarm.node_key import NodeKey
from coop.wire.generated import coop_pb2 as pb
from coop.wire.receipts import receipt_to_proto
from tests.ledger.conftest import COORDINATOR, Receipts, span_flops_per_token
from tests.ledger.test_booking import flipped_byte
from tests.waiting import wait_for_async

WAIT_S = 30.0


class FakeNetwork:
    """Nodes by endpoint; counts the Receipts calls in progress at once across all of them."""

    def __init__(self) -> None:
        self.nodes: dict[str, FakeNode] = {}
        self.dialled: list[str] = []
        self.in_call = 0
        self.most_in_call = 0

    def add(self, node_id: str, institution: str, **kwargs: Any) -> FakeNode:
        node = FakeNode(self, node_id, institution, **kwargs)
        self.nodes[node.endpoint] = node
        return node

    def stub(self, endpoint: str, institution: str, node_id: str) -> FakeNode:
        self.dialled.append(endpoint)
        return self.nodes[endpoint]


class FakeNode:
    """A node's receipt calls. It hands out its outbox (an institution's nodes may share one) and
    forgets what is acknowledged; `gate`: it answers only once the gate is set (a slow node);
    `flood`: receipts it adds to every answer, whatever it was asked for."""

    def __init__(
        self,
        network: FakeNetwork,
        node_id: str,
        institution: str,
        *,
        outbox: dict[str, pb.SignedReceipt] | None = None,
        gate: asyncio.Event | None = None,
        flood: tuple[pb.SignedReceipt, ...] = (),
    ) -> None:
        self.network = network
        self.announcement = announcement(node_id, institution)
        self.outbox = {} if outbox is None else outbox
        self.gate = gate
        self.flood = flood
        self.calls = 0
        self.acked: list[str] = []

    @property
    def endpoint(self) -> str:
        return self.announcement.endpoint

    async def Receipts(self, request: pb.ReceiptsRequest, timeout: float) -> pb.ReceiptBatch:
        self.calls += 1
        self.network.in_call += 1
        self.network.most_in_call = max(self.network.most_in_call, self.network.in_call)
        try:
            if self.gate is not None:
                await asyncio.wait_for(self.gate.wait(), timeout)
            return pb.ReceiptBatch(receipts=[*list(self.outbox.values())[: request.limit], *self.flood])
        finally:
            self.network.in_call -= 1

    async def AckReceipts(self, ack: pb.ReceiptAck, timeout: float) -> pb.ReceiptAckReply:
        for receipt_id in [*ack.booked, *ack.rejected]:
            self.outbox.pop(receipt_id, None)
            self.acked.append(receipt_id)
        return pb.ReceiptAckReply()


def announcement(node_id: str, institution: str) -> NodeAnnouncement:
    return NodeAnnouncement(
        node_id=node_id,
        pool_id="p",
        model_hash="ab12",
        start=0,
        end=10,
        endpoint=f"{node_id}.{institution}.test:4000",
        institution=institution,
        throughput_tps=1.0,
        free_cache_bytes=1 << 20,
        announced_at=1.0,
        expires_at=2.0,
    )


def collector(receipts: Receipts, network: FakeNetwork, **kwargs: Any) -> ReceiptCollector:
    metering = Metering(FairShare(), span_flops_per_token)
    nodes = [node.announcement for node in network.nodes.values()]
    return ReceiptCollector(receipts.ledger, receipts.checker(), metering, lambda: network, lambda: nodes, **kwargs)


def honest(receipts: Receipts, node: FakeNode) -> str:
    """A session the coordinator saw `node` serve, and the node's receipt for it, in the node's outbox."""
    seen = receipts.observe(node.announcement.institution, "beta", node_id=node.announcement.node_id)
    body = receipts.body(seen)
    node.outbox[body.receipt_id] = receipt_to_proto(body.receipt_id, receipts.sign(body))
    return body.receipt_id


def booked(ledger: Ledger) -> set[str]:
    return {r.receipt_id for r in ledger.receipts()}


@contextmanager
def commits(ledger: Ledger) -> Iterator[list[int]]:
    """Counts the transactions committed inside the block."""
    count = [0]

    def committed(_connection: object) -> None:
        count[0] += 1

    event.listen(ledger.engine, "commit", committed)
    try:
        yield count
    finally:
        event.remove(ledger.engine, "commit", committed)


def run(test: Callable[[], Any]) -> Any:
    return asyncio.run(test())


def test_a_slow_node_does_not_hold_up_another_nodes_booking(receipts: Receipts) -> None:
    async def scenario() -> None:
        network = FakeNetwork()
        slow = network.add("slow", "beta", gate=asyncio.Event())  # listed first: polled first
        fast = network.add("fast", "alpha")
        slow_id, fast_id = honest(receipts, slow), honest(receipts, fast)
        collecting = collector(receipts, network)

        round_ = asyncio.create_task(collecting.collect_once())
        await wait_for_async("the fast node's receipt to be acknowledged", lambda: fast.acked, WAIT_S)

        assert booked(receipts.ledger) == {fast_id}  # booked while the slow node still had not answered
        assert slow.calls == 1 and not round_.done()
        assert slow.gate is not None
        slow.gate.set()
        settled = await round_
        assert sorted(settled.booked) == sorted([slow_id, fast_id]) == sorted(booked(receipts.ledger))

    run(scenario)


def test_a_node_that_does_not_answer_is_cut_off_at_its_budget_and_polled_less_often(receipts: Receipts) -> None:
    async def scenario() -> None:
        network = FakeNetwork()
        mute = network.add("mute", "beta", gate=asyncio.Event())  # never answers
        fast = network.add("fast", "alpha")
        collecting = collector(receipts, network, poll_budget_s=0.05)
        receipt_ids = []
        for round_ in range(4):
            receipt_ids.append(honest(receipts, fast))
            settled = await collecting.collect_once()
            assert settled.booked == [receipt_ids[-1]], round_
        assert booked(receipts.ledger) == set(receipt_ids)
        assert mute.calls == 2  # rounds 0 and 2: after a timeout it sits one round out, then two
        tally = collecting.schedule.tallies[NodeKey("beta", "mute")]
        assert (tally.timeouts, tally.skipped, tally.backoff_rounds) == (2, 2, 2)
        assert collecting.schedule.tallies[NodeKey("alpha", "fast")].polls == 4

    run(scenario)


def test_polls_run_at_once_up_to_the_bound(receipts: Receipts) -> None:
    """One poll per institution at a time (its nodes one after another), at most the bound in all."""

    async def scenario() -> None:
        network = FakeNetwork()
        gate = asyncio.Event()
        nodes = [network.add(f"n{i}", ("alpha", "beta")[i % 2], gate=gate) for i in range(6)]
        receipt_ids = {honest(receipts, node) for node in nodes}
        collecting = collector(receipts, network, max_concurrent_polls=1)

        round_ = asyncio.create_task(collecting.collect_once())
        await wait_for_async("one poll to be waiting for its node", lambda: network.in_call == 1, WAIT_S)
        for _ in range(20):
            await asyncio.sleep(0)  # the other five had every chance to start
        assert network.in_call == 1 and sum(node.calls for node in nodes) == 1
        gate.set()
        settled = await round_

        assert set(settled.booked) == receipt_ids == booked(receipts.ledger)
        assert network.most_in_call == 1

    run(scenario)


def test_a_members_node_ids_share_one_poll_budget(receipts: Receipts) -> None:
    """Eight mute node ids of one member get one budget a round between them, not eight: the first
    one spends it; the next round starts with those it did not reach. Another member is not held up."""

    async def scenario() -> None:
        network = FakeNetwork()
        minted = [network.add(f"m{i}", "alpha", gate=asyncio.Event()) for i in range(8)]  # never answer
        other = network.add("other", "beta")
        collecting = collector(receipts, network, poll_budget_s=0.05)
        receipt_id = honest(receipts, other)
        settled = await collecting.collect_once()
        assert settled.booked == [receipt_id]
        assert [node.calls for node in minted] == [1, 0, 0, 0, 0, 0, 0, 0]
        await collecting.collect_once()  # m0 sits this round out (it timed out); m1 is first of the rest
        assert [node.calls for node in minted] == [1, 1, 0, 0, 0, 0, 0, 0]

    run(scenario)


def test_a_flood_of_junk_is_refused_in_two_transactions_and_audited_once_per_interval(receipts: Receipts) -> None:
    async def scenario() -> ReceiptCollector:
        network = FakeNetwork()
        alpha = receipts.pool["alpha"]

        def signed(node_id: str, **overrides: Any) -> pb.SignedReceipt:
            body = receipts.body(receipts.observe(node_id=node_id, record=False), **overrides)
            return receipt_to_proto(body.receipt_id, receipts.sign(body, signer=alpha))

        forged = flipped_byte(receipts.sign(receipts.body(receipts.observe(node_id="flood"))))
        flood = (
            *(receipt_to_proto(f"forged-{i}", forged) for i in range(90)),
            *(signed(f"ghost-{i % 3}") for i in range(90)),  # alpha's certificates for nodes it does not list
            *(signed("flood", coordinator="beta") for _ in range(60)),
        )
        node = network.add("flood", "alpha", flood=flood)
        honest_id = honest(receipts, node)
        collecting = collector(receipts, network, batch=200)

        with commits(receipts.ledger) as committed:
            first = await collecting.collect_once()

        # honest + 90 forged + 90 for ghosts + 19 for another coordinator; 41 over the batch of 200
        assert first.booked == [honest_id] and booked(receipts.ledger) == {honest_id}
        assert (len(first.rejected), first.dropped) == (90 + 19, 90 + 41)
        assert committed[0] == 2  # the booking and the audit events: not one transaction per junk receipt
        [audited] = receipts.ledger.audit_events()
        assert (audited.action, audited.subject) == ("receipts_rejected", "flood")
        assert "109 receipts rejected and 131 dropped" in audited.detail
        assert set(node.acked) == {honest_id, *first.rejected}  # the ghosts' are not this node's to settle

        for _ in range(3):  # skipped, polled, skipped
            await collecting.collect_once()
        tally = collecting.schedule.tallies[NodeKey("alpha", "flood")]
        assert (tally.polls, tally.skipped, tally.backoff_rounds) == (2, 2, 2)
        assert (tally.rejected, tally.dropped) == (109 + 110, 131 + 130)
        assert len(receipts.ledger.audit_events()) == 1  # the second poll's junk waits for the interval

        collecting.close()
        [gathered, _] = receipts.ledger.audit_events()
        assert gathered.subject == "flood" and "110 receipts rejected and 130 dropped" in gathered.detail
        assert (collecting.digest.written, collecting.digest.suppressed) == (2, 109 + 131 + 110 + 130 - 2)
        assert booked(receipts.ledger) == {honest_id}
        return collecting

    collecting = run(scenario)

    app = FastAPI()  # the counters, as the admin view's JSON API shows them
    mount_admin(app, AdminContext(receipts.pool.directory, receipts.ledger, receipt_collection=collecting.stats))
    with TestClient(app) as client:
        token = receipts.pool.info.admin_token
        shown = client.get("/admin/api/receipt-collection", headers={"Authorization": f"Bearer {token}"})
    assert shown.status_code == 200, shown.text
    [flood] = shown.json()["nodes"]
    assert (flood["node_id"], flood["booked"], flood["rejected"], flood["dropped"]) == ("flood", 1, 219, 261)
    assert (flood["polls"], flood["skipped"], flood["backoff_rounds"]) == (2, 2, 2)
    assert (shown.json()["audit_events_written"], shown.json()["audit_events_suppressed"]) == (2, 478)


def test_a_lone_rejection_is_its_own_audit_event(receipts: Receipts) -> None:
    async def scenario() -> None:
        network = FakeNetwork()
        node = network.add("n1", "alpha")
        body = receipts.body(receipts.observe(node_id="n1"), decode_tokens=10**6, flops=1)
        node.outbox[body.receipt_id] = receipt_to_proto(body.receipt_id, receipts.sign(body))

        settled = await collector(receipts, network).collect_once()

        assert settled.rejected == [body.receipt_id] and node.acked == [body.receipt_id]
        [audited] = receipts.ledger.audit_events()
        assert (audited.action, audited.subject) == ("receipt_rejected", body.receipt_id)
        assert audited.detail.startswith("node n1: ") and "claims 1 FLOPs" in audited.detail

    run(scenario)


def test_nodes_sharing_an_outbox_each_book_their_own_receipts(receipts: Receipts) -> None:
    """A member's nodes keep their receipts in one outbox by default: each hands out the other's too."""

    async def scenario() -> None:
        network = FakeNetwork()
        shared: dict[str, pb.SignedReceipt] = {}
        first = network.add("first", "alpha", outbox=shared)
        second = network.add("second", "alpha", outbox=shared)
        receipt_ids = {honest(receipts, first), honest(receipts, second), honest(receipts, first)}
        collecting = collector(receipts, network)

        settled = await collecting.collect_once()

        assert set(settled.booked) == receipt_ids == booked(receipts.ledger) and not shared
        assert settled.deferred >= 1 and settled.junk == 0
        assert receipts.ledger.audit_events() == []
        tallies = collecting.schedule.tallies
        assert (tallies[NodeKey("alpha", "first")].booked, tallies[NodeKey("alpha", "second")].booked) == (2, 1)
        assert (
            tallies[NodeKey("alpha", "first")].backoff_rounds == tallies[NodeKey("alpha", "second")].backoff_rounds == 0
        )

    run(scenario)


def test_two_institutions_nodes_of_one_id_in_one_session_are_each_booked(receipts: Receipts) -> None:
    """Node ids are unique only within an institution: alpha's and beta's "gpu-0" serve one session, each is paid."""

    async def scenario() -> None:
        network = FakeNetwork()
        nodes = [network.add("gpu-0", "alpha"), network.add("gpu-0", "beta")]
        first = receipts.observe("alpha", COORDINATOR, node_id="gpu-0", blocks=(0, 10), decode_tokens=20)
        second = first.model_copy(update={"provider": "beta", "start_block": 10, "end_block": 20, "decode_tokens": 30})
        receipts.ledger.observe([second])
        receipt_ids = []
        for node, seen in zip(nodes, (first, second), strict=True):
            body = receipts.body(seen)
            node.outbox[body.receipt_id] = receipt_to_proto(body.receipt_id, receipts.sign(body))
            receipt_ids.append(body.receipt_id)
        collecting = collector(receipts, network)

        settled = await collecting.collect_once()

        assert sorted(settled.booked) == sorted(receipt_ids) and settled.junk == settled.deferred == 0
        assert [node.acked for node in nodes] == [[receipt_ids[0]], [receipt_ids[1]]]
        paid = {r.receipt_id: (r.provider, r.decode_tokens) for r in receipts.ledger.receipts()}
        assert paid == {receipt_ids[0]: ("alpha", 20), receipt_ids[1]: ("beta", 30)}
        assert receipts.ledger.audit_events() == []

    run(scenario)
