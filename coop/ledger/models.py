"""Every ledger table, in one place. Schema changes go through coop/ledger/migrations.

Amounts are whole FLOPs (1 credit = 10**12 FLOPs) in 64-bit integers, so a booking is exact:
a provider is credited the very FLOPs its receipt names. Balances are never stored; they are
sums of postings (`coop.ledger.store.Ledger.balances`).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Column, Index, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

from coop.pool.registry import RESERVED_INSTITUTION

FLOPS_PER_CREDIT = 10**12
# grants are paid from here; it goes negative by what the pool has given away. No member may take the name.
POOL_ACCOUNT = RESERVED_INSTITUTION


def flops_to_credits(flops: int) -> float:
    return flops / FLOPS_PER_CREDIT


def credits_to_flops(amount: float) -> int:
    return round(amount * FLOPS_PER_CREDIT)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Institution(SQLModel, table=True):
    __tablename__ = "institutions"

    name: str = Field(primary_key=True, max_length=128)
    created_at: dt.datetime = Field(default_factory=utcnow)
    # below this balance (FLOPs, usually negative) the institution's requests get 402; None = no floor
    credit_floor_flops: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class Account(SQLModel, table=True):
    """One per institution, plus the pool account that grants come from."""

    __tablename__ = "accounts"

    name: str = Field(primary_key=True, max_length=128)
    institution: str | None = Field(default=None, foreign_key="institutions.name", max_length=128)
    created_at: dt.datetime = Field(default_factory=utcnow)


class Node(SQLModel, table=True):
    """A node as seen through its receipts: which institution runs it, what it served, when."""

    __tablename__ = "nodes"

    node_id: str = Field(primary_key=True, max_length=128)
    institution: str = Field(foreign_key="institutions.name", max_length=128)
    start_block: int
    end_block: int
    first_seen: dt.datetime = Field(default_factory=utcnow)
    last_seen: dt.datetime = Field(default_factory=utcnow)


class Certificate(SQLModel, table=True):
    """Member certificates that signed receipts, kept so `coop ledger verify` can recheck every one."""

    __tablename__ = "certificates"

    sha256: str = Field(primary_key=True, max_length=64)
    institution: str = Field(max_length=128)
    pem: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class Observation(SQLModel, table=True):
    """What the coordinator saw one node of one session do: the ceiling for that node's receipt."""

    __tablename__ = "observations"
    __table_args__ = (UniqueConstraint("session_id", "node_id"),)

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(max_length=128)
    node_id: str = Field(max_length=128)
    provider: str = Field(max_length=128)
    consumer: str = Field(max_length=128)
    start_block: int
    end_block: int
    prefill_tokens: int
    decode_tokens: int
    seen_at: dt.datetime = Field(default_factory=utcnow)


class Receipt(SQLModel, table=True):
    """A node-signed, coordinator-countersigned account of compute; `body` is exactly what was signed."""

    __tablename__ = "receipts"
    __table_args__ = (
        Index("ix_receipts_provider_time", "provider", "ended_at"),
        # a node bills its part of a session once, whatever receipt ids it makes up
        UniqueConstraint("session_id", "node_id", name="uq_receipts_session_node"),
    )

    receipt_id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(max_length=128, index=True)
    node_id: str = Field(max_length=128)
    provider: str = Field(foreign_key="institutions.name", max_length=128)
    consumer: str = Field(foreign_key="institutions.name", max_length=128, index=True)
    model_hash: str = Field(max_length=128)
    start_block: int
    end_block: int
    prefill_tokens: int
    decode_tokens: int
    flops: int = Field(sa_column=Column(BigInteger, nullable=False))
    started_at: dt.datetime
    ended_at: dt.datetime
    booked_at: dt.datetime = Field(default_factory=utcnow, index=True)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    node_signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    node_cert_sha256: str = Field(foreign_key="certificates.sha256", max_length=64)
    countersignature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    coordinator_cert_sha256: str = Field(foreign_key="certificates.sha256", max_length=64)


class Grant(SQLModel, table=True):
    __tablename__ = "grants"

    grant_id: str = Field(primary_key=True, max_length=64)
    institution: str = Field(foreign_key="institutions.name", max_length=128)
    flops: int = Field(sa_column=Column(BigInteger, nullable=False))
    reason: str = Field(max_length=500)
    granted_by: str = Field(max_length=128)
    created_at: dt.datetime = Field(default_factory=utcnow)


class Posting(SQLModel, table=True):
    """One leg of a booking. The legs of a receipt or grant sum to zero and commit together."""

    __tablename__ = "postings"
    __table_args__ = (Index("ix_postings_account_time", "account", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    account: str = Field(foreign_key="accounts.name", max_length=128)
    amount_flops: int = Field(sa_column=Column(BigInteger, nullable=False))
    receipt_id: str | None = Field(default=None, foreign_key="receipts.receipt_id", max_length=64, index=True)
    grant_id: str | None = Field(default=None, foreign_key="grants.grant_id", max_length=64)
    created_at: dt.datetime = Field(default_factory=utcnow)


class AuditEvent(SQLModel, table=True):
    """Append-only: grants, floors, rejected receipts, admin actions. Never updated or deleted."""

    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    at: dt.datetime = Field(default_factory=utcnow, index=True)
    actor: str = Field(max_length=128)  # "admin", an institution, "coordinator"
    action: str = Field(max_length=64)  # past tense: "credits_granted", "receipt_rejected", ...
    subject: str = Field(default="", max_length=200)
    detail: str = Field(default="", max_length=4000)
