"""The coordinator's receipt collector: pull signed receipts from nodes, check, countersign, book, acknowledge.

Pulling (rather than nodes pushing) means neither side needs to know where the other restarted:
every `interval_s` the collector asks each node it can see for the receipts of sessions this
coordinator opened. Before each round it writes down what it saw (the observations receipts are
checked against). A receipt is acknowledged only after its booking committed, so a crash at any
point leaves it in the node's outbox, to be booked (exactly once, by id) on the next round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from coop.coordinator.metering import Metering
from coop.errors import CoopError, ReceiptPending, ReceiptRejected
from coop.ledger.booking import ReceiptChecker
from coop.ledger.store import Booking, Ledger
from coop.swarm.announcement import NodeAnnouncement
from coop.wire.channels import ChannelPool
from coop.wire.generated import coop_pb2 as pb
from coop.wire.receipts import receipt_from_proto

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0
MAX_BATCHES_PER_NODE = 10  # per round, so that one node cannot keep the collector to itself


@dataclass
class Settlement:
    """The outcome of one batch from one node."""

    booked: list[str] = field(default_factory=list)  # booked now, or found already booked
    rejected: list[str] = field(default_factory=list)
    pending: int = 0


class ReceiptCollector:
    def __init__(
        self,
        ledger: Ledger,
        checker: ReceiptChecker,
        metering: Metering,
        channels: Callable[[], ChannelPool],
        nodes: Callable[[], Sequence[NodeAnnouncement]],
        *,
        interval_s: float = 2.0,
        batch: int = 200,
    ) -> None:
        self.ledger = ledger
        self.checker = checker
        self.metering = metering
        self._channels = channels
        self._nodes = nodes
        self.interval_s = interval_s
        self.batch = batch

    async def run(self) -> None:
        while True:
            try:
                await self.collect_once()
            except CoopError as exc:  # e.g. the database is down: try again next round
                log.warning("receipt collection failed: %s", exc)
            await asyncio.sleep(self.interval_s)

    async def write_observations(self) -> None:
        """Write down what was seen as soon as a session ends: a crash then loses (almost) nothing."""
        while True:
            await self.metering.observed.wait()
            try:
                await asyncio.to_thread(self.flush_observations)
            except CoopError as exc:
                log.warning("could not write observations (will retry): %s", exc)
                await asyncio.sleep(self.interval_s)

    async def collect_once(self) -> Settlement:
        await asyncio.to_thread(self.flush_observations)
        total = Settlement()
        for node in self._nodes():
            try:
                for _ in range(MAX_BATCHES_PER_NODE):
                    settled = await self._collect_from(node)
                    total.booked += settled.booked
                    total.rejected += settled.rejected
                    total.pending += settled.pending
                    if len(settled.booked) + len(settled.rejected) < self.batch:
                        break  # drained (or only pending ones left)
            except grpc.aio.AioRpcError as exc:
                log.info("no receipts from node %s this round: %s", node.node_id, exc.code().name)
            except Exception:  # one node's trouble (or one bad batch) must not stop collection for the rest
                log.exception("collecting receipts from node %s failed; next round retries", node.node_id)
        return total

    def flush_observations(self) -> None:
        rows = self.metering.drain()
        try:
            self.ledger.observe(rows)
        except CoopError:
            self.metering.put_back(rows)
            raise

    async def _collect_from(self, node: NodeAnnouncement) -> Settlement:
        stub = self._channels().stub(node.endpoint, node.institution, node.node_id)
        batch = await stub.Receipts(pb.ReceiptsRequest(limit=self.batch), timeout=CALL_TIMEOUT_S)
        if not batch.receipts:
            return Settlement()
        settled = await asyncio.to_thread(self.settle, batch.receipts)
        if settled.booked or settled.rejected:
            ack = pb.ReceiptAck(booked=settled.booked, rejected=settled.rejected)
            await stub.AckReceipts(ack, timeout=CALL_TIMEOUT_S)
        return settled

    def settle(self, receipts: Sequence[pb.SignedReceipt]) -> Settlement:
        """Check and book one batch; rejections become audit events."""
        settled = Settlement()
        bookings: list[Booking] = []
        billed: dict[tuple[str, str], str] = {}  # (session, node) -> receipt id, within this batch
        for receipt in receipts:
            signed = receipt_from_proto(receipt)
            try:
                booking = self.checker.check(signed)
                key = (booking.body.session_id, booking.body.node_id)
                if billed.setdefault(key, booking.body.receipt_id) != booking.body.receipt_id:
                    raise ReceiptRejected(f"receipt {booking.body.receipt_id}: a second bill for session {key[0]}")
            except ReceiptPending:
                settled.pending += 1
                continue
            except ReceiptRejected as exc:
                log.warning("rejected a receipt: %s", exc)
                actor = f"coordinator:{self.checker.coordinator}"
                self.ledger.record(actor, "receipt_rejected", subject=receipt.receipt_id, detail=str(exc))
                settled.rejected.append(receipt.receipt_id)
                continue
            if booking.body.receipt_id != receipt.receipt_id:
                settled.rejected.append(receipt.receipt_id)
                continue
            bookings.append(booking)
        self.ledger.book(bookings)  # idempotent: ids booked before are skipped
        settled.booked = [b.body.receipt_id for b in bookings]
        return settled
