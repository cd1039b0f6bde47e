"""What this coordinator knows of every node's honesty, kept in the ledger's audit trail when it has one."""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections import Counter
from collections.abc import Callable, Sequence

from coop.coordinator.spot_checks.policy import SpotCheckPolicy
from coop.ledger.store import AuditEntry, Ledger
from coop.swarm.routing import Hop
from coop.swarm.trust import DISPUTED, FAILED, PASSED, QUARANTINED, TrustRecord

log = logging.getLogger(__name__)

AuditNote = tuple[str, str, str]  # (action, subject, detail), actions from coop.swarm.trust
AuditSink = Callable[[list[AuditNote]], None]  # appends to the ledger's audit trail (blocking)
LedgerTrust = Callable[[], dict[str, TrustRecord]]  # every node's record, as the ledger has it (blocking)
TRUST_REFRESH_S = 5.0  # how often quarantines and lifts by others are read back from the ledger


class TrustBook:
    """What this coordinator knows of every node's honesty, and the sampling it implies.

    Without a ledger the book lives in memory; with one, every verdict is appended to its audit trail
    and the book follows it (`follow`), so quarantines are pool-wide and an admin's lift takes effect.
    """

    def __init__(self, policy: SpotCheckPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.records: dict[str, TrustRecord] = {}
        self.rng = rng or random.Random(secrets.randbits(64))
        self._audit: AuditSink | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._version = 0  # bumped by each verdict here, so a ledger read that raced it is not applied
        self._predecessors: dict[str, set[str]] = {}  # per node, those after whose push it failed a check

    def record(self, node_id: str) -> TrustRecord:
        return self.records.setdefault(node_id, TrustRecord())

    def quarantined(self) -> frozenset[str]:
        return frozenset(n for n, r in self.records.items() if r.quarantined)

    def sampled(self, hops: Sequence[Hop]) -> bool:
        new = any(self.record(h.node_id).passed < self.policy.history_steps for h in hops)
        return self.rng.random() < (self.policy.new_node_rate if new else self.policy.rate)

    def passed(self, counts: Counter[str]) -> None:
        """A checked session ended: its nodes computed these many checked steps right."""
        for node_id, steps in counts.items():
            self.record(node_id).passed += steps
        self._write([(PASSED, node_id, str(steps)) for node_id, steps in counts.items()])

    def convict(self, node_id: str, predecessor: str, evidence: str) -> None:
        """A check proved the node's output wrong, given the input its `predecessor` pushed it.

        A node that knows a session's sketch seed can push a perturbation its sketches do not show
        (coop.wire.sketches), which makes the next hop look wrong. So a node whose input came from
        another node is quarantined only once it failed after two different predecessors; a failure
        on the coordinator's own input (`predecessor` ""), nobody can have framed.
        """
        framers = self._predecessors.setdefault(node_id, set())
        framers.add(predecessor)
        if not predecessor or len(framers) >= 2:
            self.quarantine(node_id, evidence)
            return
        self.record(node_id).failed += 1
        log.warning("node %s failed a check after %s: %s", node_id, predecessor, evidence)
        self._write([(FAILED, node_id, evidence)])

    def quarantine(self, node_id: str, evidence: str) -> None:
        record = self.record(node_id)
        record.failed += 1
        record.quarantined = evidence
        log.warning("node %s quarantined: %s", node_id, evidence)
        self._write([(QUARANTINED, node_id, evidence)])

    def disputed(self, node_ids: Sequence[str], evidence: str) -> None:
        for node_id in node_ids:
            self.record(node_id).disputed += 1
        log.warning("spot check disputed between %s: %s", ", ".join(node_ids), evidence)
        self._write([(DISPUTED, ",".join(node_ids), evidence)])

    def _write(self, notes: list[AuditNote]) -> None:
        self._version += 1
        if self._audit is None or not notes:
            return
        task = asyncio.create_task(self._append(self._audit, notes))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    @staticmethod
    async def _append(audit: AuditSink, notes: list[AuditNote]) -> None:
        try:
            await asyncio.to_thread(audit, notes)
        except Exception as exc:  # the verdict holds here either way; the pool-wide list lags
            log.warning("could not audit %s: %s", notes, exc)

    async def follow(self, audit: AuditSink, read: LedgerTrust, every_s: float = TRUST_REFRESH_S) -> None:
        """Write verdicts to the ledger from now on, and read everyone's back every `every_s`."""
        self._audit = audit
        while True:
            version = self._version
            try:
                records = await asyncio.to_thread(read)
            except Exception as exc:  # a database hiccup must not end the following for good
                log.warning("could not read the nodes' trust records from the ledger: %s", exc)
            else:
                if version == self._version:
                    self.records = records
            await asyncio.sleep(every_s)


def ledger_audit(ledger: Ledger, actor: str) -> AuditSink:
    def append(notes: list[AuditNote]) -> None:
        ledger.record_many(
            [AuditEntry(actor, action, subject[:200], detail[:4000]) for action, subject, detail in notes]
        )

    return append
