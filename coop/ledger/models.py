"""Every ledger table, in one place. Schema changes go through coop/ledger/migrations.

Amounts are whole FLOPs (1 credit = 10**12 FLOPs), so a booking is exact: a provider is credited
the very FLOPs it was paid for. An amount that can outgrow 64 bits (a posting, a grant, a floor) is
stored in two integer columns (`coop.ledger.amounts`). Balances are never stored; they are sums of
postings (`coop.ledger.queries.LedgerQueries.balances`). Grants and credit floors carry the exact bytes the
pool admin signed, receipts the bytes the node signed, so `coop ledger verify` can recheck them all.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal, InvalidOperation

from sqlalchemy import BigInteger, Column, Index, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

from coop.errors import InvalidInput
from coop.ledger.amounts import join
from coop.pool.registry import RESERVED_INSTITUTION
from coop.swarm.node_key import NodeKey

FLOPS_PER_CREDIT = 10**12
# grants are paid from here; it goes negative by what the pool has given away. No member may take the name.
POOL_ACCOUNT = RESERVED_INSTITUTION


def flops_to_credits(flops: int) -> float:
    return flops / FLOPS_PER_CREDIT


def credits_to_flops(amount: float | int | str | Decimal) -> int:
    """Exact in decimal: 0.1 credits is 10**11 FLOPs, not what 0.1 * 10**12 rounds to in binary."""
    try:
        flops = Decimal(str(amount)) * FLOPS_PER_CREDIT
    except InvalidOperation as exc:
        raise InvalidInput(f"{amount!r} is not a number of credits") from exc
    if not flops.is_finite():
        raise InvalidInput(f"{amount!r} is not a finite number of credits")
    return int(flops.to_integral_value())


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Institution(SQLModel, table=True):
    __tablename__ = "institutions"

    name: str = Field(primary_key=True, max_length=128)
    created_at: dt.datetime = Field(default_factory=utcnow)


class Account(SQLModel, table=True):
    """One per institution, plus the pool account that grants come from."""

    __tablename__ = "accounts"

    name: str = Field(primary_key=True, max_length=128)
    institution: str | None = Field(default=None, foreign_key="institutions.name", max_length=128)
    created_at: dt.datetime = Field(default_factory=utcnow)


class Node(SQLModel, table=True):
    """A node as seen through its receipts: what it served, when.

    Keyed by (institution, node id): a member mints its node ids, so two institutions may both run a "gpu-0".
    """

    __tablename__ = "nodes"

    institution: str = Field(primary_key=True, foreign_key="institutions.name", max_length=128)
    node_id: str = Field(primary_key=True, max_length=128)
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
    """What the coordinator sent one node in one session: the ceiling for the sum of that node's receipts.

    Written when the session's first step ran and raised as it goes (`coop.coordinator.accounts.observations`), so
    that a coordinator crash leaves the tokens sent up to its last write; tokens never go down. One per
    (session, provider, node id): two institutions' "gpu-0" may serve one session.
    """

    __tablename__ = "observations"
    __table_args__ = (
        UniqueConstraint("session_id", "provider", "node_id", name="uq_observations_session_provider_node"),
    )

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
    # the API key that admitted the session (its id, `coop.receipts.api_key_id`); "" = none: the
    # coordinator's own institution pays
    api_key_id: str = Field(default="", max_length=16, sa_column_kwargs={"server_default": ""})
    # the content hash of the model the session ran: its receipts must name it (a coordinator may
    # serve several models, priced differently); "" = not recorded (rows written before it was)
    model_hash: str = Field(default="", max_length=128, sa_column_kwargs={"server_default": ""})

    @property
    def node(self) -> NodeKey:
        return NodeKey(self.provider, self.node_id)


class Receipt(SQLModel, table=True):
    """A node-signed, coordinator-countersigned account of compute; `body` is exactly what the node signed.

    Tokens and FLOPs are what was paid: the body's claim, or less where the claim exceeded what the
    coordinator observed. The countersignature covers them, the consumer and the API key id.
    """

    __tablename__ = "receipts"
    __table_args__ = (
        Index("ix_receipts_provider_time", "provider", "ended_at"),
        # a node (provider, node id) bills each batch of its part of a session once, whatever receipt ids it makes up
        UniqueConstraint("session_id", "provider", "node_id", "batch", name="uq_receipts_session_provider_node_batch"),
    )

    receipt_id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(max_length=128, index=True)
    node_id: str = Field(max_length=128)
    batch: int = Field(default=0, sa_column_kwargs={"server_default": "0"})  # the body's batch number
    provider: str = Field(foreign_key="institutions.name", max_length=128)
    consumer: str = Field(foreign_key="institutions.name", max_length=128, index=True)
    model_hash: str = Field(max_length=128)
    start_block: int
    end_block: int
    prefill_tokens: int
    decode_tokens: int
    flops: int = Field(sa_column=Column(BigInteger, nullable=False))  # at most 2**62 (ReceiptBody)
    started_at: dt.datetime
    ended_at: dt.datetime
    booked_at: dt.datetime = Field(default_factory=utcnow, index=True)
    api_key_id: str = Field(default="", max_length=16, sa_column_kwargs={"server_default": ""})  # as observed
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    node_signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    node_cert_sha256: str = Field(foreign_key="certificates.sha256", max_length=64)
    countersignature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    coordinator_cert_sha256: str = Field(foreign_key="certificates.sha256", max_length=64)


class Grant(SQLModel, table=True):
    """Credits from the pool account to an institution, as the pool admin signed them (`body`)."""

    __tablename__ = "grants"

    grant_id: str = Field(primary_key=True, max_length=64)
    institution: str = Field(foreign_key="institutions.name", max_length=128)
    amount_hi: int = Field(sa_column=Column(BigInteger, nullable=False))
    amount_lo: int = Field(sa_column=Column(BigInteger, nullable=False))
    reason: str = Field(max_length=500)
    granted_by: str = Field(max_length=128)
    created_at: dt.datetime = Field(default_factory=utcnow)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))

    @property
    def flops(self) -> int:
        return join(self.amount_hi, self.amount_lo)


class CreditFloor(SQLModel, table=True):
    """An institution's credit floor as the pool admin signed it; the newest row (highest id) is in force.

    Below the floor (FLOPs, usually negative) the institution's requests get 402; no amount = no floor.
    """

    __tablename__ = "credit_floors"
    __table_args__ = (Index("ix_credit_floors_institution", "institution", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    institution: str = Field(foreign_key="institutions.name", max_length=128)
    floor_hi: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    floor_lo: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    set_by: str = Field(max_length=128)
    set_at: dt.datetime = Field(default_factory=utcnow)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))

    @property
    def floor_flops(self) -> int | None:
        return None if self.floor_hi is None else join(self.floor_hi, self.floor_lo)


class Posting(SQLModel, table=True):
    """One leg of a booking. The legs of a receipt or grant sum to zero and commit together."""

    __tablename__ = "postings"
    __table_args__ = (Index("ix_postings_account_time", "account", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    account: str = Field(foreign_key="accounts.name", max_length=128)
    amount_hi: int = Field(sa_column=Column(BigInteger, nullable=False))  # amount = hi * 10**9 + lo
    amount_lo: int = Field(sa_column=Column(BigInteger, nullable=False))  # 0 <= lo < 10**9
    receipt_id: str | None = Field(default=None, foreign_key="receipts.receipt_id", max_length=64, index=True)
    grant_id: str | None = Field(default=None, foreign_key="grants.grant_id", max_length=64)
    created_at: dt.datetime = Field(default_factory=utcnow)

    @property
    def amount_flops(self) -> int:
        return join(self.amount_hi, self.amount_lo)


class AuditEvent(SQLModel, table=True):
    """Append-only: grants, floors, rejected receipts, admin actions. Never updated or deleted."""

    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    at: dt.datetime = Field(default_factory=utcnow, index=True)
    actor: str = Field(max_length=128)  # "admin", an institution, "coordinator"
    action: str = Field(max_length=64)  # past tense: "credits_granted", "receipt_rejected", ...
    subject: str = Field(default="", max_length=200)
    detail: str = Field(default="", max_length=4000)
