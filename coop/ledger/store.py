"""The ledger database: bookings as balanced postings, one transaction each, same code on SQLite and PostgreSQL.

A debit and its credit commit together or not at all; a receipt id is booked at most once (its
primary key), so resubmitting a receipt, from a restarted node or to a restarted coordinator, is
harmless. SQLite runs in WAL mode with synchronous=FULL: a booking that returned survives a crash.
The reads (balances, receipts, audit log, ...) are in `coop.ledger.queries`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, case, insert, select, tuple_
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.sql.dml import Insert
from sqlmodel import Session, SQLModel, col

from coop.errors import InvalidInput, LedgerError
from coop.ledger.amounts import split
from coop.ledger.database import open_engine
from coop.ledger.grants import AdminSigner
from coop.ledger.models import (
    POOL_ACCOUNT,
    Account,
    AuditEvent,
    Certificate,
    CreditFloor,
    Grant,
    Institution,
    Node,
    Observation,
    Posting,
    Receipt,
    credits_to_flops,
    flops_to_credits,
    utcnow,
)
from coop.ledger.queries import LedgerQueries
from coop.receipts import Payment, ReceiptBody, SignedReceipt, cert_sha256
from coop.swarm.node_key import NodeKey, key_of

log = logging.getLogger(__name__)

BOOK_ATTEMPTS = 5  # a booking that lost a race to another booker is run again, skipping what that one booked
# Plain Core inserts on the tables: the ORM's bulk-insert path costs more per row.
_RECEIPTS = SQLModel.metadata.tables[Receipt.__tablename__]
_POSTINGS = SQLModel.metadata.tables[Posting.__tablename__]
_AUDIT = SQLModel.metadata.tables[AuditEvent.__tablename__]
_OBSERVATIONS = SQLModel.metadata.tables[Observation.__tablename__]


@dataclass(frozen=True)
class Booking:
    """A receipt that passed every check, what it is paid, and the coordinator's countersignature of both."""

    body: ReceiptBody
    signed: SignedReceipt
    payment: Payment
    countersignature: bytes
    coordinator_cert_pem: bytes
    capped: str = ""  # why it is paid less than it claims (an audit event when booked); "" if it is not

    @property
    def consumer(self) -> str:
        return self.payment.consumer


@dataclass(frozen=True)
class AuditEntry:
    """An audit event to append (`Ledger.record_many` writes many in one transaction)."""

    actor: str
    action: str  # past tense: "receipt_rejected", "credits_granted", ...
    subject: str = ""
    detail: str = ""


class Ledger(LedgerQueries):
    """The ledger's writes; its reads come from `LedgerQueries`."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self._known: set[tuple[str, str]] = set()  # (table, key) rows known to exist: saves a query per booking

    @classmethod
    def open(cls, url: str) -> Ledger:
        """Connect and bring the schema up to date (Alembic migrations)."""
        return cls(open_engine(url))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        try:
            with Session(self.engine) as session, session.begin():
                yield session
        except BaseException as exc:
            self._known.clear()  # a rolled-back transaction may have taken rows with it
            if isinstance(exc, SQLAlchemyError):
                raise LedgerError(f"ledger transaction failed: {exc}") from exc
            raise

    def book(self, bookings: Sequence[Booking]) -> list[str]:
        """Book receipts not booked before, all in one transaction; returns the ids newly booked.

        Another booker on the same database (a second coordinator process) may commit some of the same
        rows first: this transaction then fails on a unique key and runs again, skipping them.
        """
        if not bookings:
            return []
        attempt = 1
        while True:
            try:
                return self._book(bookings)
            except LedgerError as exc:
                if attempt == BOOK_ATTEMPTS or not _lost_a_race(exc.__cause__):
                    raise
                log.debug("booking lost a race to another booker (attempt %d): %s", attempt, exc)
            attempt += 1

    def _book(self, bookings: Sequence[Booking]) -> list[str]:
        with self._transaction() as session:
            ids = [b.body.receipt_id for b in bookings]
            existing = set(
                session.execute(select(col(Receipt.receipt_id)).where(col(Receipt.receipt_id).in_(ids))).scalars()
            )
            fresh: dict[str, Booking] = {}
            for b in bookings:
                if b.body.receipt_id not in existing:
                    fresh.setdefault(b.body.receipt_id, b)
            if not fresh:
                return []
            # Rows are written table by table, each in key order: two bookers on PostgreSQL then wait
            # for each other (and one retries) instead of deadlocking.
            ordered = sorted(fresh.values(), key=lambda b: b.body.receipt_id)
            institutions = {b.body.institution for b in ordered} | {b.consumer for b in ordered}
            for name in sorted(institutions):
                if ("institution", name) not in self._known:
                    self._ensure_institution(session, name)
            certificates: dict[str, tuple[bytes, str | None]] = {
                cert_sha256(b.signed.cert_pem): (b.signed.cert_pem, b.body.institution) for b in ordered
            }
            for b in ordered:
                certificates.setdefault(cert_sha256(b.coordinator_cert_pem), (b.coordinator_cert_pem, None))
            for _, (pem, institution) in sorted(certificates.items()):
                self._ensure_certificate(session, pem, institution)
            self._touch_nodes(session, [b.body for b in ordered])
            now = utcnow()
            session.execute(insert(_RECEIPTS), [_receipt_row(b, now) for b in ordered])
            postings = []
            for b in ordered:
                rid, flops = b.body.receipt_id, b.payment.flops
                postings.append(_posting(b.body.institution, flops, now, receipt_id=rid))
                postings.append(_posting(b.consumer, -flops, now, receipt_id=rid))
            session.execute(insert(_POSTINGS), postings)
            capped = [b for b in ordered if b.capped]
            if capped:
                session.execute(insert(_AUDIT), [_capped_event(b, now) for b in capped])
            return list(fresh)

    def grant(self, institution: str, credits: float | str, *, reason: str, actor: str, signer: AdminSigner) -> Grant:
        """Credits from the pool account to an institution (negative credits take them back), signed by the admin."""
        flops = credits_to_flops(credits)
        if flops == 0:
            raise InvalidInput("a grant must move a non-zero amount")
        if not reason.strip():
            raise InvalidInput("a grant needs a reason (--reason)")
        hi, lo = split(flops)
        body, signed = signer.grant(institution, flops, reason=reason[:500], granted_by=actor)
        grant = Grant(
            grant_id=body.grant_id,
            institution=institution,
            amount_hi=hi,
            amount_lo=lo,
            reason=body.reason,
            granted_by=actor,
            created_at=dt.datetime.fromtimestamp(body.granted_at, dt.UTC),
            body=signed.body,
            signature=signed.signature,
        )
        with self._transaction() as session:
            self._ensure_institution(session, institution)
            session.add(grant)
            session.flush()
            now = utcnow()
            session.execute(
                insert(_POSTINGS),
                [
                    _posting(institution, flops, now, grant_id=grant.grant_id),
                    _posting(POOL_ACCOUNT, -flops, now, grant_id=grant.grant_id),
                ],
            )
            detail = f"{flops_to_credits(flops):g} credits: {reason}"
            session.add(AuditEvent(actor=actor, action="credits_granted", subject=institution, detail=detail))
            session.flush()
            session.expunge(grant)
        return grant

    def set_credit_floor(
        self, institution: str, credits: float | str | None, *, actor: str, signer: AdminSigner
    ) -> None:
        """Below this balance the institution's requests are refused (402); None removes the floor."""
        flops = None if credits is None else credits_to_flops(credits)
        hi, lo = (None, None) if flops is None else split(flops)
        body, signed = signer.floor(institution, flops, set_by=actor)
        with self._transaction() as session:
            self._ensure_institution(session, institution)
            session.add(
                CreditFloor(
                    institution=institution,
                    floor_hi=hi,
                    floor_lo=lo,
                    set_by=actor,
                    set_at=dt.datetime.fromtimestamp(body.set_at, dt.UTC),
                    body=signed.body,
                    signature=signed.signature,
                )
            )
            detail = "no floor" if flops is None else f"floor {flops_to_credits(flops):g} credits"
            session.add(AuditEvent(actor=actor, action="credit_floor_set", subject=institution, detail=detail))

    def record(self, actor: str, action: str, subject: str = "", detail: str = "") -> None:
        """Append an audit event."""
        self.record_many([AuditEntry(actor, action, subject, detail)])

    def record_many(self, entries: Sequence[AuditEntry]) -> None:
        """Append audit events in one transaction: one commit (one fsync on SQLite) however many there are."""
        if not entries:
            return
        now = utcnow()
        with self._transaction() as session:
            session.execute(insert(_AUDIT), [_audit_row(entry, now) for entry in entries])

    def observe(self, observations: Sequence[Observation]) -> None:
        """Store what the coordinator saw nodes do, one row per (session, node); receipts may claim no more.

        A row written before (an earlier checkpoint of a live session, or a write whose commit
        succeeded but reported an error) is raised to the new tokens, never lowered. Callers pass
        one row per (session, provider, node id): PostgreSQL refuses to upsert one row twice in a statement.
        """
        if not observations:
            return
        rows = [o.model_dump(exclude={"id"}) for o in observations]
        with self._transaction() as session:
            session.execute(_upsert_observations(self.engine), rows)

    # -- helpers -------------------------------------------------------------------------------

    def _ensure_institution(self, session: Session, name: str) -> Institution:
        if name.lower() == POOL_ACCOUNT:
            raise InvalidInput(f"{name!r} is the pool's own account, not an institution")
        if ("institution", name) in self._known:
            row = session.get(Institution, name)
            if row is not None:
                return row
        row = session.get(Institution, name)
        if row is None:
            row = Institution(name=name)
            session.add(row)
            session.flush()  # no ORM relationships: flush in foreign-key order by hand
            session.add(Account(name=name, institution=name))
            if session.get(Account, POOL_ACCOUNT) is None:
                session.add(Account(name=POOL_ACCOUNT))
            session.flush()
        self._known.add(("institution", name))
        return row

    def _ensure_certificate(self, session: Session, pem: bytes, institution: str | None) -> None:
        digest = cert_sha256(pem)
        if ("certificate", digest) in self._known:
            return
        if session.get(Certificate, digest) is None:
            from coop.pool.identity import claimed_identity

            institution = institution or claimed_identity(pem).institution
            session.add(Certificate(sha256=digest, institution=institution, pem=pem))
            session.flush()
        self._known.add(("certificate", digest))

    @staticmethod
    def _touch_nodes(session: Session, bodies: Sequence[ReceiptBody]) -> None:
        """Whatever order receipts arrive in, a node's span is its newest receipt's; first/last seen only widen.

        A node is its (institution, node id): another institution's node of the same id is another row.
        """
        latest: dict[NodeKey, ReceiptBody] = {}
        first_seen: dict[NodeKey, dt.datetime] = {}
        for body in bodies:
            key = key_of(body)
            if key not in latest or body.ended_at > latest[key].ended_at:
                latest[key] = body
            first_seen[key] = min(first_seen.get(key, body.started), body.started)
        # FOR UPDATE (PostgreSQL): read the rows another booker may be changing only once it has committed
        query = (
            select(Node)
            .where(tuple_(col(Node.institution), col(Node.node_id)).in_(list(latest)))
            .order_by(col(Node.institution), col(Node.node_id))
            .with_for_update()
        )
        rows = {key_of(row): row for row in session.execute(query).scalars()}
        for key in sorted(latest):
            body, row = latest[key], rows.get(key)
            if row is None:
                session.add(
                    Node(
                        institution=key.institution,
                        node_id=key.node_id,
                        start_block=body.start_block,
                        end_block=body.end_block,
                        first_seen=first_seen[key],
                        last_seen=body.ended,
                    )
                )
                continue
            if body.ended >= row.last_seen:
                row.last_seen, row.start_block, row.end_block = body.ended, body.start_block, body.end_block
            row.first_seen = min(row.first_seen, first_seen[key])
        session.flush()


def _lost_a_race(exc: BaseException | None) -> bool:
    """A unique key another transaction committed first, or PostgreSQL aborting this one to break a deadlock."""
    if isinstance(exc, IntegrityError):
        return True
    return isinstance(exc, OperationalError) and getattr(exc.orig, "sqlstate", None) in ("40001", "40P01")


def _upsert_observations(engine: Engine) -> Insert:
    """Insert observations; one already there keeps the larger of its tokens and the new ones."""
    table = _OBSERVATIONS
    new = postgresql_insert(table) if engine.dialect.name == "postgresql" else sqlite_insert(table)
    raised = {
        name: case((new.excluded[name] > table.c[name], new.excluded[name]), else_=table.c[name])
        for name in ("prefill_tokens", "decode_tokens")
    }
    return new.on_conflict_do_update(
        index_elements=[table.c.session_id, table.c.provider, table.c.node_id],
        set_={**raised, "seen_at": new.excluded.seen_at},
    )


def _posting(
    account: str, flops: int, at: dt.datetime, *, receipt_id: str | None = None, grant_id: str | None = None
) -> dict[str, Any]:
    hi, lo = split(flops)
    return {
        "account": account,
        "amount_hi": hi,
        "amount_lo": lo,
        "receipt_id": receipt_id,
        "grant_id": grant_id,
        "created_at": at,
    }


def _capped_event(b: Booking, at: dt.datetime) -> dict[str, Any]:
    entry = AuditEntry(f"coordinator:{b.body.coordinator}", "receipt_capped", b.body.receipt_id, b.capped)
    return _audit_row(entry, at)


def _audit_row(e: AuditEntry, at: dt.datetime) -> dict[str, Any]:
    lengths = {"actor": 128, "action": 64, "subject": 200, "detail": 4000}  # the columns' sizes
    return {"at": at, **{name: getattr(e, name)[:size] for name, size in lengths.items()}}


def _receipt_row(b: Booking, booked_at: dt.datetime) -> dict[str, Any]:
    body, paid = b.body, b.payment
    return {
        "receipt_id": body.receipt_id,
        "session_id": body.session_id,
        "node_id": body.node_id,
        "batch": body.batch,
        "provider": body.institution,
        "consumer": paid.consumer,
        "model_hash": body.model_hash,
        "start_block": body.start_block,
        "end_block": body.end_block,
        "prefill_tokens": paid.prefill_tokens,
        "decode_tokens": paid.decode_tokens,
        "flops": paid.flops,
        "started_at": body.started,
        "ended_at": body.ended,
        "booked_at": booked_at,
        "api_key_id": paid.api_key_id,
        "body": b.signed.body,
        "node_signature": b.signed.signature,
        "node_cert_sha256": cert_sha256(b.signed.cert_pem),
        "countersignature": b.countersignature,
        "coordinator_cert_sha256": cert_sha256(b.coordinator_cert_pem),
    }
