"""Nodes' trust records, derived from the ledger's audit trail: checks passed, failed, disputed; quarantine.

The audit trail is the pool-wide quarantine list: only pool coordinators (and the admin) write the
ledger, every coordinator of the pool reads it, and it is append-only, so a quarantine and its lift
are both on the record. Spot checks (coop/coordinator/spot_checks/) write these events; the admin
view, `coop node trust` and every coordinator's routing read them back through `trust_records`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

PASSED = "spot_check_passed"  # subject: node id; detail: how many checked steps it computed right
QUARANTINED = "node_quarantined"  # subject: node id; detail: the evidence
FAILED = "spot_check_failed"  # subject: node id; detail: the evidence (a failure not yet enough to quarantine)
DISPUTED = "spot_check_disputed"  # subject: the node ids, comma-separated; detail: the evidence
LIFTED = "node_quarantine_lifted"  # subject: node id; detail: who lifted it and why
ACTIONS = (PASSED, FAILED, QUARANTINED, DISPUTED, LIFTED)


@dataclass
class TrustRecord:
    passed: int = 0  # checked steps this node computed right
    failed: int = 0  # checks it failed
    disputed: int = 0  # disputes it was part of
    quarantined: str = ""  # the evidence, while it is quarantined


def trust_records(events: Iterable[tuple[int, str, str, str]]) -> dict[str, TrustRecord]:
    """Per node id, from audit events (id, action, subject, detail) in any order."""
    records: dict[str, TrustRecord] = {}
    for _id, action, subject, detail in sorted(events):
        if action == DISPUTED:
            for node_id in subject.split(","):
                records.setdefault(node_id, TrustRecord()).disputed += 1
            continue
        record = records.setdefault(subject, TrustRecord())
        if action == PASSED:
            record.passed += int(detail) if detail.isdigit() else 0
        elif action == FAILED:
            record.failed += 1
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


def trust_from_ledger(ledger: AuditTrail) -> dict[str, TrustRecord]:
    """Every node's trust record, as the pool's ledger has it."""
    events = [event for action in ACTIONS for event in ledger.audit_events(action=action)]
    return trust_records((event.id or 0, event.action, event.subject, event.detail) for event in events)
