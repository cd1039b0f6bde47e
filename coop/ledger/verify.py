"""`coop ledger verify`: recheck the whole ledger from its raw material and the pool directory.

Nothing in the database is trusted; what vouches for it comes from the pool directory (`PoolTrust`):
the pool CA certificate and the API keys, and from the models' manifests the admin names: every
receipt of a named model must claim exactly its tokens x the manifest's FLOPs per token of its
blocks (receipts of models not named are counted as unchecked, and the CLI says so).

Balances are recomputed from postings; every booking's legs must sum to zero and credit and debit
exactly who and what its receipt or grant says. Every receipt must carry a valid node signature by
a certificate of this pool naming the provider, valid when the work ended; and a valid
countersignature, by a coordinator of the pool, of what it paid, charged to the institution that
owns the API key that admitted the session. Every grant and credit floor must be signed by the pool
admin (the CA key).

Revocations are the coordinators' to apply when they book (`coop.ledger.booking`), not verify's: a
coordinator that had not heard of a revocation yet booked in good faith.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from sqlalchemy import select
from sqlmodel import Session, col

from coop.errors import CoopError
from coop.ledger.booking import CLOCK_SKEW_S
from coop.ledger.grants import floor_payload, grant_payload, parse_floor, parse_grant, verify_admin_signature
from coop.ledger.models import POOL_ACCOUNT, Certificate, CreditFloor, Grant, Receipt
from coop.ledger.signers import countersigner_of, provider_of
from coop.ledger.store import Ledger
from coop.pool.api_keys import ApiKeyStore
from coop.pool.ca import verify_signature
from coop.receipts import API_KEY_ID_CHARS, Payment, ReceiptBody, body_payload, countersign_payload

T = TypeVar("T")

MAX_PROBLEMS = 100


class ModelSpans(Protocol):
    """What verify needs of a model's manifest (`coop.model.manifest.Manifest` is one)."""

    @property
    def num_blocks(self) -> int: ...

    def span_flops_per_token(self, start: int, end: int) -> int: ...


@dataclass(frozen=True)
class PoolTrust:
    """What verification believes: the CA and the API keys from the pool directory, and the manifests
    of the models the admin named, by content hash."""

    pool_id: str
    ca_cert_pem: bytes
    api_keys: ApiKeyStore
    models: Mapping[str, ModelSpans] = field(default_factory=dict)

    @classmethod
    def load(cls, pool_dir: Path | str, models: Mapping[str, ModelSpans] | None = None) -> PoolTrust:
        from coop.pool.registry import API_KEYS_FILE, PoolInfo

        info = PoolInfo.load(pool_dir)
        keys = ApiKeyStore.load(info.directory / API_KEYS_FILE)
        return cls(info.pool_id, info.ca_cert_pem(), keys, dict(models or {}))


@dataclass
class VerifyReport:
    receipts: int = 0
    grants: int = 0
    floors: int = 0
    postings: int = 0
    balances_flops: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unchecked_models: dict[str, int] = field(default_factory=dict)  # receipts per model with no manifest given

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)


def verify_ledger(ledger: Ledger, trust: PoolTrust) -> VerifyReport:
    report = VerifyReport()
    legs: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for posting in ledger.all_postings():
        report.postings += 1
        amount = posting.amount_flops
        report.balances_flops[posting.account] = report.balances_flops.get(posting.account, 0) + amount
        if (posting.receipt_id is None) == (posting.grant_id is None):
            report.problem(f"posting {posting.id} belongs to neither exactly one receipt nor one grant")
            continue
        entry = ("receipt", posting.receipt_id) if posting.receipt_id else ("grant", posting.grant_id or "")
        legs[entry][posting.account] += amount
    if sum(report.balances_flops.values()) != 0:
        report.problem(f"all postings sum to {sum(report.balances_flops.values())}, not 0")
    derived = {b.institution: b.balance_flops for b in ledger.balances()}
    for name, flops in derived.items():
        if report.balances_flops.get(name, 0) != flops:
            report.problem(f"balance of {name!r}: {flops} reported, {report.balances_flops.get(name, 0)} from postings")

    certificates = ledger.certificates()
    billed: dict[tuple[str, str, str, int], str] = {}
    with Session(ledger.engine) as session:
        for receipt in session.execute(select(Receipt).order_by(col(Receipt.receipt_id))).scalars():
            report.receipts += 1
            batch = (receipt.session_id, receipt.provider, receipt.node_id, receipt.batch)
            earlier = billed.setdefault(batch, receipt.receipt_id)
            if earlier != receipt.receipt_id:
                report.problem(
                    f"receipt {receipt.receipt_id} bills batch {receipt.batch} of session {receipt.session_id} "
                    f"again ({earlier})"
                )
            expected = _sum({receipt.provider: receipt.flops}, {receipt.consumer: -receipt.flops})
            _check_legs(
                report, f"receipt {receipt.receipt_id}", legs.pop(("receipt", receipt.receipt_id), {}), expected
            )
            _check_receipt(report, receipt, certificates, trust)
        for grant in session.execute(select(Grant).order_by(col(Grant.grant_id))).scalars():
            report.grants += 1
            expected = _sum({grant.institution: grant.flops}, {POOL_ACCOUNT: -grant.flops})
            _check_legs(report, f"grant {grant.grant_id}", legs.pop(("grant", grant.grant_id), {}), expected)
            _check_grant(report, grant, trust)
        for floor in session.execute(select(CreditFloor).order_by(col(CreditFloor.id))).scalars():
            report.floors += 1
            _check_floor(report, floor, trust)
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
    report: VerifyReport, receipt: Receipt, certificates: dict[str, Certificate], trust: PoolTrust
) -> None:
    what = f"receipt {receipt.receipt_id}"
    node_cert = certificates.get(receipt.node_cert_sha256)
    coordinator_cert = certificates.get(receipt.coordinator_cert_sha256)
    if node_cert is None or coordinator_cert is None:
        report.problem(f"{what}: a signing certificate is missing")
        return
    payment = Payment(
        receipt.consumer, receipt.api_key_id, receipt.prefill_tokens, receipt.decode_tokens, receipt.flops
    )
    try:
        body = ReceiptBody.from_bytes(receipt.body)
        signer = provider_of(trust.ca_cert_pem, node_cert.pem, trust.pool_id, body.ended)
        institution = signer.institution
        if signer.node_id != body.node_id:
            report.problem(f"{what}: signed by {signer.describe()}, not by node {body.node_id!r}")
        verify_signature(node_cert.pem, body_payload(receipt.body), receipt.node_signature)
        coordinator = countersigner_of(trust.ca_cert_pem, coordinator_cert.pem, trust.pool_id, body.ended)
        if coordinator != body.coordinator:
            report.problem(f"{what}: countersigned by {coordinator!r}, but the session was {body.coordinator!r}'s")
        verify_signature(coordinator_cert.pem, countersign_payload(receipt.body, payment), receipt.countersignature)
    except CoopError as exc:
        report.problem(f"{what}: {exc}")
        return
    stored = (
        receipt.receipt_id,
        receipt.session_id,
        receipt.node_id,
        receipt.batch,
        receipt.provider,
        receipt.model_hash,
        receipt.start_block,
        receipt.end_block,
    )
    signed = (
        body.receipt_id,
        body.session_id,
        body.node_id,
        body.batch,
        body.institution,
        body.model_hash,
        body.start_block,
        body.end_block,
    )
    if institution != body.institution:
        report.problem(f"{what}: signed by {institution!r} but credits {body.institution!r}")
    if stored != signed:
        report.problem(f"{what}: stored columns differ from the signed body")
    if body.pool_id != trust.pool_id:
        report.problem(f"{what}: for pool {body.pool_id!r}")
    _check_paid(report, what, body, payment)
    _check_flops(report, what, body, trust.models)
    _check_consumer(report, what, body, payment, trust.api_keys)


def _check_paid(report: VerifyReport, what: str, body: ReceiptBody, paid: Payment) -> None:
    """Paid no more than claimed, at the claim's own FLOPs per token."""
    amounts = (paid.prefill_tokens, paid.decode_tokens, paid.flops)
    if min(amounts) < 0 or paid.prefill_tokens > body.prefill_tokens or paid.decode_tokens > body.decode_tokens:
        report.problem(f"{what}: pays {paid.prefill_tokens}+{paid.decode_tokens} tokens, not within what was claimed")
    elif paid.flops > body.flops or (paid.prefill_tokens + paid.decode_tokens) * body.flops != paid.flops * body.tokens:
        report.problem(f"{what}: pays {paid.flops} FLOPs, not its tokens at the receipt's FLOPs per token")


def _check_flops(report: VerifyReport, what: str, body: ReceiptBody, models: Mapping[str, ModelSpans]) -> None:
    """The claim is its tokens at the manifest's FLOPs per token of its blocks, never the node's own figure."""
    model = models.get(body.model_hash)
    if model is None:
        report.unchecked_models[body.model_hash] = report.unchecked_models.get(body.model_hash, 0) + 1
        return
    if not 0 <= body.start_block < body.end_block <= model.num_blocks:
        report.problem(f"{what}: blocks {body.start_block}:{body.end_block} are not blocks of model {body.model_hash}")
        return
    expected = body.tokens * model.span_flops_per_token(body.start_block, body.end_block)
    if body.flops != expected:
        report.problem(
            f"{what}: claims {body.flops} FLOPs for {body.tokens} tokens of blocks {body.start_block}:"
            f"{body.end_block}; the manifest of model {body.model_hash} makes it {expected}"
        )


def _check_consumer(report: VerifyReport, what: str, body: ReceiptBody, paid: Payment, api_keys: ApiKeyStore) -> None:
    """The consumer is the owner of the API key that admitted the session (none: the coordinator's own)."""
    if not paid.api_key_id:
        if paid.consumer != body.coordinator:
            report.problem(
                f"{what}: charges {paid.consumer!r} without an API key; only the coordinator's own institution "
                f"({body.coordinator!r}) may be charged so"
            )
        return
    keys = (
        [r for r in api_keys.records if r.sha256.startswith(paid.api_key_id)]
        if len(paid.api_key_id) == API_KEY_ID_CHARS
        else []
    )
    owners = {r.institution for r in keys}
    if owners != {paid.consumer}:
        named = ", ".join(repr(o) for o in sorted(owners)) or "no institution of this pool"
        report.problem(f"{what}: charges {paid.consumer!r} through API key {paid.api_key_id}, which is {named}'s")
    elif all(r.created_at > body.ended_at + CLOCK_SKEW_S for r in keys):
        report.problem(f"{what}: charged through API key {paid.api_key_id}, created after the work ended")


def _check_grant(report: VerifyReport, grant: Grant, trust: PoolTrust) -> None:
    _check_admin_signed(
        report,
        f"grant {grant.grant_id}",
        trust,
        grant_payload(grant.body),
        grant.signature,
        lambda: parse_grant(grant.body),
        lambda body: (body.grant_id, body.pool_id, body.institution, body.amount, body.reason, body.granted_by),
        (grant.grant_id, trust.pool_id, grant.institution, grant.flops, grant.reason, grant.granted_by),
    )


def _check_floor(report: VerifyReport, floor: CreditFloor, trust: PoolTrust) -> None:
    _check_admin_signed(
        report,
        f"credit floor {floor.id} of {floor.institution!r}",
        trust,
        floor_payload(floor.body),
        floor.signature,
        lambda: parse_floor(floor.body),
        lambda body: (body.pool_id, body.institution, body.amount),
        (trust.pool_id, floor.institution, floor.floor_flops),
    )


def _check_admin_signed(
    report: VerifyReport,
    what: str,
    trust: PoolTrust,
    payload: bytes,
    signature: bytes,
    parse: Callable[[], T],
    signed_columns: Callable[[T], tuple[object, ...]],
    stored_columns: tuple[object, ...],
) -> None:
    """An entry the pool admin signed: its signature and body must hold, and its stored columns match the body."""
    try:
        verify_admin_signature(trust.ca_cert_pem, payload, signature, what)
        body = parse()
    except CoopError as exc:
        report.problem(f"{what}: {exc}")
        return
    if signed_columns(body) != stored_columns:
        report.problem(f"{what}: stored columns differ from what the pool admin signed")
