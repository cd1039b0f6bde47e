"""What the receipt collector remembers about each node: counters, backoff, and rejections to audit.

Pure bookkeeping with an injected clock, so that its rules are tested without a network:

- Backoff: a poll that brought junk (receipts rejected, or dropped: signed for a node that is not
  listed, or more than were asked for) or that ran out of its time budget doubles the number of
  rounds the node is then skipped, up to `MAX_BACKOFF_ROUNDS`; a clean poll clears it. A node that
  floods is polled ever less often (at the cap, once per 33 rounds: about a minute at the default
  2-s interval), and an honest node that once had a bad receipt waits one round.
- Audit: an institution's rejected and dropped receipts, all its nodes' together (a member mints node
  ids at will), become at most one audit event per `interval_s`. Its first bad batch is written at
  once (a lone rejection as its own event, as it always was, more
  as one event with their count, naming the first `AUDIT_SAMPLES` with their reasons); what follows
  within the interval is gathered into one such event, written when the interval is over. A flood of junk is thus a
  bounded number of rows, written with the batch, not an fsynced transaction per receipt.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from coop.ledger.store import AuditEntry
from coop.swarm.node_key import NodeKey

MAX_BACKOFF_ROUNDS = 32
AUDIT_INTERVAL_S = 60.0
AUDIT_SAMPLES = 10  # rejections named, each with its reason, in an event that counts many
FORGET_AFTER_S = 600.0  # a node out of the swarm this long loses its counters (and its backoff)


@dataclass
class NodeTally:
    """One node's receipt collection so far, as the admin view shows it."""

    polls: int = 0
    booked: int = 0
    rejected: int = 0  # failed a check: audited, and acknowledged as rejected
    dropped: int = 0  # signed for a node that is not listed, or beyond the batch asked for: not booked
    deferred: int = 0  # a listed sibling's (members' nodes may share an outbox): left for its own poll
    pending: int = 0  # in the last poll: sessions not written down yet
    timeouts: int = 0  # polls that ran out of their time budget
    errors: int = 0  # polls that failed otherwise (node unreachable, ...)
    skipped: int = 0  # rounds skipped in backoff
    backoff_rounds: int = 0  # rounds skipped after each poll now


@dataclass(frozen=True)
class PollOutcome:
    booked: int = 0
    rejected: int = 0
    dropped: int = 0
    deferred: int = 0
    pending: int = 0
    timed_out: bool = False
    failed: bool = False

    @property
    def junk(self) -> int:
        return self.rejected + self.dropped


class PollSchedule:
    """Which nodes a round polls, and each node's counters. Called on the event loop only."""

    def __init__(
        self,
        max_backoff_rounds: int = MAX_BACKOFF_ROUNDS,
        forget_after_s: float = FORGET_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_backoff_rounds = max_backoff_rounds
        self.forget_after_s = forget_after_s
        self._clock = clock
        self.tallies: dict[NodeKey, NodeTally] = {}
        self.total = NodeTally()  # booked, rejected and dropped of every node since start, never forgotten
        self._skip: dict[NodeKey, int] = {}  # rounds left to skip
        self._listed_at: dict[NodeKey, float] = {}

    def due(self, listed: Iterable[NodeKey]) -> list[NodeKey]:
        """The listed nodes to poll this round; a node in backoff counts one round off instead."""
        now = self._clock()
        chosen = []
        for node in listed:
            self._listed_at[node] = now
            tally = self.tallies.setdefault(node, NodeTally())
            if self._skip.get(node, 0) > 0:
                self._skip[node] -= 1
                tally.skipped += 1
            else:
                chosen.append(node)
        for node, at in list(self._listed_at.items()):
            if now - at > self.forget_after_s:
                del self._listed_at[node]
                self.tallies.pop(node, None)
                self._skip.pop(node, None)
        return chosen

    def polled(self, node: NodeKey, outcome: PollOutcome) -> None:
        tally = self.tallies.setdefault(node, NodeTally())
        tally.polls += 1
        tally.booked += outcome.booked
        tally.rejected += outcome.rejected
        tally.dropped += outcome.dropped
        tally.deferred += outcome.deferred
        tally.pending = outcome.pending
        self.total.booked += outcome.booked
        self.total.rejected += outcome.rejected
        self.total.dropped += outcome.dropped
        tally.timeouts += outcome.timed_out
        tally.errors += outcome.failed
        if outcome.junk or outcome.timed_out:
            tally.backoff_rounds = min(max(1, 2 * tally.backoff_rounds), self.max_backoff_rounds)
        elif not outcome.failed:
            tally.backoff_rounds = 0
        self._skip[node] = tally.backoff_rounds

    def snapshot(self) -> dict[NodeKey, NodeTally]:
        return {node: dataclasses.replace(tally) for node, tally in self.tallies.items()}


@dataclass
class _Gathered:
    """An institution's rejections since its last audit event."""

    rejected: int = 0
    node_ids: list[str] = field(default_factory=list)  # its nodes they came from, in order
    dropped: int = 0
    samples: list[tuple[str, str]] = field(default_factory=list)  # the first few: (receipt id, why)


class RejectionDigest:
    """Rejected and dropped receipts, turned into at most one audit event per institution per interval.

    Fed from booking threads, so it locks.
    """

    def __init__(self, actor: str, interval_s: float = AUDIT_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.actor = actor
        self.interval_s = interval_s
        self._clock = clock
        self._gathered: dict[str, _Gathered] = {}
        self._last_written: dict[str, float] = {}
        self.written = 0  # audit events handed out to be written
        self.suppressed = 0  # rejections folded into another one's event instead of their own
        self._lock = threading.Lock()

    def add(self, node: NodeKey, receipt_id: str, reason: str, *, dropped: bool = False, count: int = 1) -> None:
        with self._lock:
            gathered = self._gathered.setdefault(node.institution, _Gathered())
            if node.node_id not in gathered.node_ids:
                gathered.node_ids.append(node.node_id)
            if len(gathered.samples) < AUDIT_SAMPLES:
                gathered.samples.append((receipt_id, reason[:300]))
            if dropped:
                gathered.dropped += count
            else:
                gathered.rejected += count

    @property
    def gathering(self) -> bool:
        """Whether any rejection waits for its event."""
        return bool(self._gathered)

    def due(self) -> list[AuditEntry]:
        """Events whose institution's interval is over (its first is due at once); they count as written."""
        now = self._clock()
        with self._lock:
            for institution, at in list(self._last_written.items()):
                if now - at >= self.interval_s and institution not in self._gathered:
                    del self._last_written[institution]
            ready = [i for i in self._gathered if now - self._last_written.get(i, -self.interval_s) >= self.interval_s]
            return [self._entry(institution, now) for institution in ready]

    def drain(self) -> list[AuditEntry]:
        """Every event gathered so far, due or not (the coordinator is stopping)."""
        now = self._clock()
        with self._lock:
            return [self._entry(institution, now) for institution in list(self._gathered)]

    def _entry(self, institution: str, now: float) -> AuditEntry:
        gathered = self._gathered.pop(institution)
        self._last_written[institution] = now
        node_id = gathered.node_ids[0]
        count = gathered.rejected + gathered.dropped
        self.written += 1
        self.suppressed += count - 1
        if count == 1:
            [(receipt_id, reason)] = gathered.samples
            return AuditEntry(self.actor, "receipt_rejected", receipt_id, f"node {node_id}: {reason}")
        named = "; ".join(f"{receipt_id or '-'}: {reason}" for receipt_id, reason in gathered.samples)
        nodes = ", ".join(gathered.node_ids[:AUDIT_SAMPLES])
        detail = (
            f"institution {institution}, nodes {nodes}: {gathered.rejected} receipts rejected "
            f"and {gathered.dropped} dropped "
            f"(for other nodes, or more than asked for) since its last audit event; "
            f"the first {len(gathered.samples)}: {named}"
        )
        return AuditEntry(self.actor, "receipts_rejected", node_id, detail)  # named by its first node
