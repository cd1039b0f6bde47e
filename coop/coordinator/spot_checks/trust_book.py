"""What this coordinator knows of every node's honesty, kept in the ledger's audit trail when it has one."""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections import Counter
from collections.abc import Callable, Collection, Sequence

from coop.coordinator.spot_checks.policy import SpotCheckPolicy
from coop.ledger.store import AuditEntry, Ledger
from coop.swarm.node_key import NodeKey, key_of
from coop.swarm.routing import Hop
from coop.swarm.trust import DISPUTED, FAILED, PASSED, QUARANTINED, TrustRecord

log = logging.getLogger(__name__)

AuditNote = tuple[str, str, str]  # (action, subject, detail), actions from coop.swarm.trust
AuditSink = Callable[[list[AuditNote]], None]  # appends to the ledger's audit trail (blocking)
LedgerTrust = Callable[[], dict[NodeKey, TrustRecord]]  # every node's record, as the ledger has it (blocking)
TRUST_REFRESH_S = 5.0  # how often quarantines and lifts by others are read back from the ledger


class TrustBook:
    """What this coordinator knows of every node's honesty, and the sampling it implies.

    Without a ledger the book lives in memory; with one, every verdict is appended to its audit trail
    and the book follows it (`follow`), so quarantines are pool-wide and an admin's lift takes effect.
    """

    def __init__(self, policy: SpotCheckPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.records: dict[NodeKey, TrustRecord] = {}
        self.rng = rng or random.Random(secrets.randbits(64))
        self._audit: AuditSink | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._version = 0  # bumped by each verdict here, so a ledger read that raced it is not applied
        # per node, the institutions after whose push it failed a check ("": the coordinator's)
        self._predecessors: dict[NodeKey, set[str]] = {}
        self._new_node_checks: Counter[str] = Counter()  # per institution, checks in flight its new nodes caused

    def record(self, node: NodeKey) -> TrustRecord:
        return self.records.setdefault(node, TrustRecord())

    def quarantined(self) -> frozenset[NodeKey]:
        return frozenset(n for n, r in self.records.items() if r.quarantined)

    def sampled(self, hops: Sequence[Hop]) -> tuple[str, ...] | None:
        """Whether to check a session over `hops`: None if not, else the institutions it is charged to
        (hand them back with `check_ended`).

        A node with little history raises the rate to `new_node_rate`, but a member mints node ids at
        will: each institution's new nodes may cause at most `new_node_checks_per_institution` checks
        at a time, beyond which its sessions are checked at the pool's `rate` like any other.
        """
        new = {h.institution for h in hops if self.record(key_of(h)).passed < self.policy.history_steps}
        charged = tuple(
            sorted(i for i in new if self._new_node_checks[i] < self.policy.new_node_checks_per_institution)
        )
        if self.rng.random() >= (self.policy.new_node_rate if charged else self.policy.rate):
            return None
        self._new_node_checks.update(charged)
        return charged

    def check_ended(self, charged: Collection[str]) -> None:
        self._new_node_checks.subtract(charged)
        self._new_node_checks = +self._new_node_checks

    def passed(self, counts: Counter[NodeKey]) -> None:
        """A checked session ended: its nodes computed these many checked steps right."""
        for node, steps in counts.items():
            self.record(node).passed += steps
        self._write([(PASSED, str(node), str(steps)) for node, steps in counts.items()])

    def convict(self, node: NodeKey, predecessor: str, evidence: str) -> None:
        """A check proved the node's output wrong, given the input that a node of institution
        `predecessor` pushed it ("": the coordinator did).

        A hop's sketches are bound to the bytes it pushed (coop.wire.sketches), so a predecessor cannot
        hide a perturbation from them; but one just under the tolerance may grow past it in the next
        hop's output. So a node whose input came from another node is quarantined only once it failed
        after predecessors of two institutions (a member's many node ids count as one); a failure on
        the coordinator's own input, nobody can have framed.
        """
        framers = self._predecessors.setdefault(node, set())
        framers.add(predecessor)
        if not predecessor or len(framers) >= 2:
            self.quarantine(node, evidence)
            return
        self.record(node).failed += 1
        log.warning("node %s failed a check after a node of %s: %s", node, predecessor, evidence)
        self._write([(FAILED, str(node), evidence)])

    def quarantine(self, node: NodeKey, evidence: str) -> None:
        record = self.record(node)
        record.failed += 1
        record.quarantined = evidence
        log.warning("node %s quarantined: %s", node, evidence)
        self._write([(QUARANTINED, str(node), evidence)])

    def disputed(self, nodes: Sequence[NodeKey], evidence: str) -> None:
        """A check no one can settle: on the record of every node of it, against none of them."""
        for node in nodes:
            self.record(node).disputed += 1
        log.warning("spot check disputed between %s: %s", ", ".join(map(str, nodes)), evidence)
        self._write([(DISPUTED, str(node), evidence) for node in nodes])

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
