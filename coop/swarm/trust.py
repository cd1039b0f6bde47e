"""Nodes' trust records, derived from the ledger's audit trail: checks passed, failed, disputed; quarantine.

The audit trail is the pool-wide quarantine list: only pool coordinators (and the admin) write the
ledger, every coordinator of the pool reads it, and it is append-only, so a quarantine and its lift
are both on the record. Spot checks (coop/coordinator/spot_checks/) write these events; the admin
view, `coop node trust` and every coordinator's routing read them back through `trust_records`.

A member mints node ids at will and they are unique only within its institution, so a record is
kept per `NodeKey` (institution, node id): a member cannot name its node like another member's and
have that one quarantined, or inherit its history. An event's subject is the key's `str`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from coop.swarm.node_key import NodeKey

PASSED = "spot_check_passed"  # subject: node key; detail: how many checked steps it computed right
QUARANTINED = "node_quarantined"  # subject: node key; detail: the evidence
FAILED = "spot_check_failed"  # subject: node key; detail: the evidence (a failure not yet enough to quarantine)
DISPUTED = "spot_check_disputed"  # subject: node key, one event per node of the dispute; detail: the evidence
LIFTED = "node_quarantine_lifted"  # subject: node key; detail: who lifted it and why
ACTIONS = (PASSED, FAILED, QUARANTINED, DISPUTED, LIFTED)


@dataclass
class TrustRecord:
    passed: int = 0  # checked steps this node computed right
    failed: int = 0  # checks it failed
    disputed: int = 0  # disputes it was part of
    quarantined: str = ""  # the evidence, while it is quarantined


def trust_records(events: Iterable[tuple[int, str, str, str]]) -> dict[NodeKey, TrustRecord]:
    """Per node, from audit events (id, action, subject, detail) in any order."""
    records: dict[NodeKey, TrustRecord] = {}
    for _id, action, subject, detail in sorted(events):
        record = records.setdefault(NodeKey.parse(subject), TrustRecord())
        if action == PASSED:
            record.passed += int(detail) if detail.isdigit() else 0
        elif action == FAILED:
            record.failed += 1
        elif action == DISPUTED:
            record.disputed += 1
        elif action == QUARANTINED:
            record.failed += 1
            record.quarantined = detail or "quarantined"
        elif action == LIFTED:
            record.quarantined = ""
    return records


class _AuditEvent(Protocol):
    id: int | None
    action: str
    subject: str
    detail: str


class AuditTrail(Protocol):
    """What `trust_from_ledger` reads: `coop.ledger.store.Ledger`."""

    def audit_events(self, *, action: str | None = None) -> Sequence[_AuditEvent]: ...


def trust_from_ledger(ledger: AuditTrail) -> dict[NodeKey, TrustRecord]:
    """Every node's trust record, as the pool's ledger has it."""
    events = [event for action in ACTIONS for event in ledger.audit_events(action=action)]
    return trust_records((event.id or 0, event.action, event.subject, event.detail) for event in events)
