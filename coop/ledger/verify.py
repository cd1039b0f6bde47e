"""`coop ledger verify`: recheck the whole ledger from its raw material.

Balances are recomputed from postings; every booking's legs must sum to zero and credit and debit
exactly who and what its receipt or grant says; every receipt's stored bytes must carry a valid
node signature by a certificate of this pool naming the provider, and a valid countersignature
charging the consumer. Nothing is trusted from the derived columns.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlmodel import Session, col

from coop.errors import CoopError
from coop.ledger.models import POOL_ACCOUNT, Certificate, Grant, Receipt
from coop.ledger.store import Ledger
from coop.pool.ca import ROLE_COORDINATOR, ROLE_NODE, verify_signature
from coop.pool.identity import verify_identity
from coop.receipts import ReceiptBody, body_payload, countersign_payload

MAX_PROBLEMS = 100


@dataclass
class VerifyReport:
    receipts: int = 0
    grants: int = 0
    postings: int = 0
    balances_flops: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)


def verify_ledger(ledger: Ledger, *, ca_cert_pem: bytes, pool_id: str) -> VerifyReport:
    report = VerifyReport()
    legs: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for posting in ledger.all_postings():
        report.postings += 1
        report.balances_flops[posting.account] = report.balances_flops.get(posting.account, 0) + posting.amount_flops
        if (posting.receipt_id is None) == (posting.grant_id is None):
            report.problem(f"posting {posting.id} belongs to neither exactly one receipt nor one grant")
            continue
        entry = ("receipt", posting.receipt_id) if posting.receipt_id else ("grant", posting.grant_id or "")
        legs[entry][posting.account] += posting.amount_flops
    if sum(report.balances_flops.values()) != 0:
        report.problem(f"all postings sum to {sum(report.balances_flops.values())}, not 0")
    derived = {b.institution: b.balance_flops for b in ledger.balances()}
    for name, flops in derived.items():
        if report.balances_flops.get(name, 0) != flops:
            report.problem(f"balance of {name!r}: {flops} reported, {report.balances_flops.get(name, 0)} from postings")

    certificates = ledger.certificates()
    billed: dict[tuple[str, str], str] = {}
    with Session(ledger.engine) as session:
        for receipt in session.execute(select(Receipt).order_by(col(Receipt.receipt_id))).scalars():
            report.receipts += 1
            earlier = billed.setdefault((receipt.session_id, receipt.node_id), receipt.receipt_id)
            if earlier != receipt.receipt_id:
                report.problem(f"receipt {receipt.receipt_id} bills session {receipt.session_id} again ({earlier})")
            expected = _sum({receipt.provider: receipt.flops}, {receipt.consumer: -receipt.flops})
            _check_legs(
                report, f"receipt {receipt.receipt_id}", legs.pop(("receipt", receipt.receipt_id), {}), expected
            )
            _check_receipt(report, receipt, certificates, ca_cert_pem, pool_id)
        for grant in session.execute(select(Grant).order_by(col(Grant.grant_id))).scalars():
            report.grants += 1
            expected = _sum({grant.institution: grant.flops}, {POOL_ACCOUNT: -grant.flops})
            _check_legs(report, f"grant {grant.grant_id}", legs.pop(("grant", grant.grant_id), {}), expected)
    for kind, entry_id in legs:
        report.problem(f"postings for {kind} {entry_id}, which does not exist")
    return report


def _sum(*parts: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for part in parts:
        for account, amount in part.items():
            total[account] += amount
    return {account: amount for account, amount in total.items() if amount != 0}


def _check_legs(report: VerifyReport, what: str, actual: dict[str, int], expected: dict[str, int]) -> None:
    actual = {account: amount for account, amount in actual.items() if amount != 0}
    if sum(actual.values()) != 0:
        report.problem(f"{what}: postings sum to {sum(actual.values())}, not 0")
    if actual != expected:
        report.problem(f"{what}: postings {actual} differ from what it books, {expected}")


def _check_receipt(
    report: VerifyReport, receipt: Receipt, certificates: dict[str, Certificate], ca_cert_pem: bytes, pool_id: str
) -> None:
    what = f"receipt {receipt.receipt_id}"
    node_cert = certificates.get(receipt.node_cert_sha256)
    coordinator_cert = certificates.get(receipt.coordinator_cert_sha256)
    if node_cert is None or coordinator_cert is None:
        report.problem(f"{what}: a signing certificate is missing")
        return
    try:
        body = ReceiptBody.from_bytes(receipt.body)
        signer = verify_identity(ca_cert_pem, node_cert.pem, pool_id=pool_id, now=body.ended).require(ROLE_NODE)
        institution = signer.institution
        if signer.node_id != body.node_id:
            report.problem(f"{what}: signed by {signer.describe()}, not by node {body.node_id!r}")
        verify_signature(node_cert.pem, body_payload(receipt.body), receipt.node_signature)
        countersigner = verify_identity(ca_cert_pem, coordinator_cert.pem, pool_id=pool_id, now=body.ended)
        coordinator = countersigner.require(ROLE_COORDINATOR).institution
        if coordinator != body.coordinator:
            report.problem(f"{what}: countersigned by {coordinator!r}, but the session was {body.coordinator!r}'s")
        countersigned = countersign_payload(receipt.body, receipt.consumer)
        verify_signature(coordinator_cert.pem, countersigned, receipt.countersignature)
    except CoopError as exc:
        report.problem(f"{what}: {exc}")
        return
    stored = (
        receipt.receipt_id,
        receipt.session_id,
        receipt.node_id,
        receipt.provider,
        receipt.model_hash,
        receipt.start_block,
        receipt.end_block,
        receipt.prefill_tokens,
        receipt.decode_tokens,
        receipt.flops,
    )
    signed = (
        body.receipt_id,
        body.session_id,
        body.node_id,
        body.institution,
        body.model_hash,
        body.start_block,
        body.end_block,
        body.prefill_tokens,
        body.decode_tokens,
        body.flops,
    )
    if institution != body.institution:
        report.problem(f"{what}: signed by {institution!r} but credits {body.institution!r}")
    if stored != signed:
        report.problem(f"{what}: stored columns differ from the signed body")
    if body.pool_id != pool_id:
        report.problem(f"{what}: for pool {body.pool_id!r}")
