"""The coordinator's receipt collector: pull signed receipts from nodes, check, countersign, book, acknowledge.

Pulling (rather than nodes pushing) means neither side needs to know where the other restarted:
every `interval_s` the collector asks each node it can see for the receipts of sessions this
coordinator opened (one per batch of a session's steps). Before each round it writes down what it
saw (the observations receipts are checked against, `coop.coordinator.accounts.observations`). A receipt is
acknowledged only after its booking committed, so a crash at any point leaves it in the node's
outbox, to be booked (exactly once, by id) on the next round.

No member can hold up another's bookings: each round starts one poll per institution (none for one
whose last poll is still running), at most `max_concurrent_polls` at a time, and does not wait for
them; a poll visits the institution's due nodes one after another, and all its calls share one time
budget (`poll_budget_s`), so a member that mints eight node ids gets no more of the collector's time
than one with a single node (the nodes a round's budget did not reach go first in the next). Nodes
are told apart by (institution, node id), as everywhere: a member cannot name its node like
another's and have that one left unpolled. Nodes come only from the swarm view, which
in a pool lists only validly signed announcements of unrevoked members: nothing else is dialled.
A node answers for itself only: a receipt signed for another node is not booked from its answer
(a listed sibling's is left for the sibling's own poll: an institution's nodes may share an
outbox). Rejections are audited per institution and interval, and junk backs the node off
(`coop.coordinator.accounts.receipt_polling`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from coop.coordinator.accounts.observations import Metering
from coop.coordinator.accounts.receipt_polling import (
    AUDIT_INTERVAL_S,
    MAX_BACKOFF_ROUNDS,
    PollOutcome,
    PollSchedule,
    RejectionDigest,
)
from coop.errors import CoopError, InvalidInput, ReceiptPending, ReceiptRejected
from coop.ledger.booking import ReceiptChecker
from coop.ledger.queries import BookedBatch
from coop.ledger.store import Booking, Ledger
from coop.receipts import ReceiptBody
from coop.swarm.announcement import NodeAnnouncement
from coop.swarm.node_key import NodeKey, key_of
from coop.wire.generated import coop_pb2 as pb
from coop.wire.receipts import receipt_from_proto

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0
ACK_MIN_TIMEOUT_S = 1.0  # an acknowledgement after a booking gets this much even past the budget
POLL_BUDGET_S = 5.0  # one institution's poll in one round, all its nodes' calls together
MAX_CONCURRENT_POLLS = 16
MAX_BATCHES_PER_NODE = 10  # per round, so that one node cannot keep the collector to itself
BATCH = 200


class Stubs(Protocol):
    """Where node stubs come from (a `ChannelPool`; a fake in tests): the collector calls Receipts and AckReceipts."""

    def stub(self, endpoint: str, institution: str, node_id: str) -> Any: ...


@dataclass
class Settlement:
    """The outcome of one batch (or of all batches of a poll, or of a round) from nodes."""

    booked: list[str] = field(default_factory=list)  # booked now, or found already booked
    rejected: list[str] = field(default_factory=list)
    pending: int = 0
    dropped: int = 0
    deferred: int = 0
    timed_out: bool = False
    failed: bool = False

    def add(self, other: Settlement) -> None:
        self.booked += other.booked
        self.rejected += other.rejected
        self.pending += other.pending
        self.dropped += other.dropped
        self.deferred += other.deferred
        self.timed_out |= other.timed_out
        self.failed |= other.failed

    @property
    def junk(self) -> int:
        return len(self.rejected) + self.dropped

    def outcome(self) -> PollOutcome:
        return PollOutcome(
            len(self.booked), len(self.rejected), self.dropped, self.deferred, self.pending, self.timed_out, self.failed
        )


class ReceiptCollector:
    def __init__(
        self,
        ledger: Ledger,
        checker: ReceiptChecker,
        metering: Metering,
        channels: Callable[[], Stubs],
        nodes: Callable[[], Sequence[NodeAnnouncement]],
        *,
        interval_s: float = 2.0,
        batch: int = BATCH,
        poll_budget_s: float = POLL_BUDGET_S,
        max_concurrent_polls: int = MAX_CONCURRENT_POLLS,
        audit_interval_s: float = AUDIT_INTERVAL_S,
        max_backoff_rounds: int = MAX_BACKOFF_ROUNDS,
    ) -> None:
        self.ledger = ledger
        self.checker = checker
        self.metering = metering
        self._channels = channels
        self._nodes = nodes
        self.interval_s = interval_s
        self.batch = batch
        self.poll_budget_s = poll_budget_s
        self.max_concurrent_polls = max_concurrent_polls
        self.schedule = PollSchedule(max_backoff_rounds)
        self.digest = RejectionDigest(f"coordinator:{checker.coordinator}", audit_interval_s)
        self._polls: dict[str, asyncio.Task[Settlement]] = {}  # institution -> its poll in progress
        self._unreached: set[NodeKey] = set()  # due last round, but its institution's budget ran out first
        self._slots: asyncio.Semaphore | None = None  # made on the event loop that polls
        self._writing = threading.Lock()  # one booking thread writes at a time

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._start_round()
                except CoopError as exc:  # e.g. the database is down: try again next round
                    log.warning("receipt collection failed: %s", exc)
                await asyncio.sleep(self.interval_s)
        finally:
            polls = list(self._polls.values())
            for task in polls:
                task.cancel()
            await asyncio.gather(*polls, return_exceptions=True)

    async def write_observations(self) -> None:
        """Write down what was seen as soon as a session opens, checkpoints or ends: a crash then loses
        at most a checkpoint's worth."""
        while True:
            await self.metering.observed.wait()
            try:
                await asyncio.to_thread(self.flush_observations)
            except CoopError as exc:
                log.warning("could not write observations (will retry): %s", exc)
                await asyncio.sleep(self.interval_s)

    async def collect_once(self) -> Settlement:
        """One round, awaited to the end of its last poll (`run` never waits for a poll)."""
        total = Settlement()
        for settled in await asyncio.gather(*await self._start_round()):
            total.add(settled)
        return total

    def stats(self) -> dict[str, Any]:
        """The collection's counters, as the admin view's JSON API shows them."""
        return {
            "nodes": [
                {"institution": n.institution, "node_id": n.node_id, **vars(t)}
                for n, t in sorted(self.schedule.snapshot().items())
            ],
            "audit_events_written": self.digest.written,
            "audit_events_suppressed": self.digest.suppressed,
        }

    def flush_observations(self) -> None:
        self.metering.flush(self.ledger.observe)

    def write_audit(self, *, everything: bool = False) -> None:
        """The due audit events (`everything`: all gathered, when stopping), in one transaction."""
        with self._writing:
            entries = self.digest.drain() if everything else self.digest.due()
            for entry in entries:
                log.warning("%s %s: %s", entry.action.replace("_", " "), entry.subject, entry.detail)
            self.ledger.record_many(entries)

    async def _start_round(self) -> list[asyncio.Task[Settlement]]:
        await asyncio.to_thread(self.flush_observations)
        if self.digest.gathering:  # rejections of nodes in backoff, or gone, whose interval is over
            await asyncio.to_thread(self.write_audit)
        nodes = {key_of(node): node for node in self._nodes()}
        by_institution: defaultdict[str, list[NodeKey]] = defaultdict(list)
        for key in nodes:
            by_institution[key.institution].append(key)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent_polls)
        due = set(self.schedule.due(k for k in nodes if k.institution not in self._polls))
        started = []
        for institution, keys in by_institution.items():
            # those the last round's budget did not reach first, then in listing order
            turn = sorted((k for k in keys if k in due), key=lambda k: k not in self._unreached)
            if not turn:
                continue
            siblings = frozenset(k.node_id for k in keys)
            task = asyncio.create_task(self._poll_member([nodes[k] for k in turn], siblings, self._slots))
            self._polls[institution] = task
            task.add_done_callback(functools.partial(self._poll_done, institution))
            started.append(task)
        return started

    def _poll_done(self, institution: str, task: asyncio.Task[Settlement]) -> None:
        if self._polls.get(institution) is task:
            del self._polls[institution]

    async def _poll_member(
        self, nodes: Sequence[NodeAnnouncement], siblings: frozenset[str], slots: asyncio.Semaphore
    ) -> Settlement:
        """Poll one institution's due `nodes` in turn, within one budget; `siblings`: all its listed node ids."""
        total = Settlement()
        async with slots:
            deadline = asyncio.get_running_loop().time() + self.poll_budget_s
            for index, node in enumerate(nodes):
                if asyncio.get_running_loop().time() >= deadline:
                    self._unreached.update(key_of(n) for n in nodes[index:])
                    break
                self._unreached.discard(key_of(node))
                total.add(await self._poll(node, siblings - {node.node_id}, deadline))
        return total

    async def _poll(self, node: NodeAnnouncement, siblings: frozenset[str], deadline: float) -> Settlement:
        total = Settlement()
        try:
            for _ in range(MAX_BATCHES_PER_NODE):
                settled = await self._collect_from(node, siblings, deadline)
                total.add(settled)
                handled = len(settled.booked) + len(settled.rejected) + settled.deferred
                if settled.junk or handled < self.batch:
                    break  # drained (or only pending ones left), or junk: no second helping
        except TimeoutError:
            total.timed_out = True
            log.info("node %s did not answer for receipts within its institution's budget", node.node_id)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                total.timed_out = True
            else:
                total.failed = True
            log.info("no receipts from node %s this round: %s", node.node_id, exc.code().name)
        except Exception:  # one node's trouble (or one bad batch) must not stop collection for the rest
            total.failed = True
            log.exception("collecting receipts from node %s failed; next round retries", node.node_id)
        self.schedule.polled(key_of(node), total.outcome())
        return total

    async def _collect_from(self, node: NodeAnnouncement, siblings: frozenset[str], deadline: float) -> Settlement:
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        if left <= 0:
            return Settlement()
        stub = self._channels().stub(node.endpoint, node.institution, node.node_id)
        batch = await stub.Receipts(pb.ReceiptsRequest(limit=self.batch), timeout=min(CALL_TIMEOUT_S, left))
        if not batch.receipts:
            return Settlement()
        settled = await asyncio.to_thread(self.settle, batch.receipts, key_of(node), siblings)
        if settled.booked or settled.rejected:
            ack = pb.ReceiptAck(booked=settled.booked, rejected=settled.rejected)
            timeout = min(CALL_TIMEOUT_S, max(deadline - loop.time(), ACK_MIN_TIMEOUT_S))
            await stub.AckReceipts(ack, timeout=timeout)
        return settled

    def settle(
        self, receipts: Sequence[pb.SignedReceipt], node: NodeKey, siblings: frozenset[str] = frozenset()
    ) -> Settlement:
        """Check and book one batch from `node`; rejections go to the audit digest."""
        settled = Settlement()
        if len(receipts) > self.batch:
            excess = len(receipts) - self.batch
            reason = f"sent {len(receipts)} receipts when asked for {self.batch}: the last {excess} were dropped"
            self.digest.add(node, "", reason, dropped=True, count=excess)
            settled.dropped += excess
            receipts = receipts[: self.batch]
        bookings: list[Booking] = []
        # (session, node) -> its batches checked in this call, booked together below
        unbooked: defaultdict[tuple[str, NodeKey], dict[int, BookedBatch]] = defaultdict(dict)
        for receipt in receipts:
            claimed = _parsed(receipt.body)  # unchecked, for the cheap tests first (None: the checks reject it)
            # a claim for another institution's node of this id is checked, and rejected as signed by this one
            if claimed is not None and claimed.node_id != node.node_id:
                if claimed.node_id in siblings:
                    settled.deferred += 1
                else:
                    reason = f"receipt {claimed.receipt_id} is for node {claimed.node_id!r}: dropped"
                    self.digest.add(node, claimed.receipt_id, reason, dropped=True)
                    settled.dropped += 1
                continue
            try:
                if claimed is not None and claimed.receipt_id != receipt.receipt_id:
                    raise ReceiptRejected(f"receipt {claimed.receipt_id} was sent as {receipt.receipt_id[:128]!r}")
                key = (claimed.session_id, key_of(claimed)) if claimed is not None else ("", NodeKey("", ""))
                booking = self.checker.check(receipt_from_proto(receipt), unbooked[key])
                paid = booking.payment
                unbooked[key][booking.body.batch] = BookedBatch(
                    booking.body.receipt_id, paid.prefill_tokens, paid.decode_tokens
                )
            except ReceiptPending:
                settled.pending += 1
                continue
            except ReceiptRejected as exc:
                self.digest.add(node, receipt.receipt_id[:128], str(exc))
                settled.rejected.append(receipt.receipt_id)
                continue
            bookings.append(booking)
        with self._writing:
            self.ledger.book(bookings)  # idempotent: ids booked before are skipped
        self.write_audit()
        settled.booked = [b.body.receipt_id for b in bookings]
        return settled

    def close(self) -> None:
        """Write every audit event still gathered (the coordinator is stopping)."""
        with contextlib.suppress(CoopError):
            self.write_audit(everything=True)


def _parsed(body: bytes) -> ReceiptBody | None:
    try:
        return ReceiptBody.from_bytes(body)
    except (InvalidInput, TypeError):
        return None
