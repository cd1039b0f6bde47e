"""Read-only ledger queries of the admin view (the ledger's own API covers writing and balances).

Aggregations run in the database, so a month of receipts costs the view one grouped query, on
SQLite and PostgreSQL alike. SQLite hands datetimes back without a zone; they are UTC (`as_utc`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Engine, Select, func, select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col

from coop.ledger.amounts import exact_sum, join
from coop.ledger.models import AuditEvent, Grant, Receipt
from coop.swarm.node_key import NodeKey

Bucket = Literal["hour", "day"]
BUCKET_SECONDS: dict[Bucket, int] = {"hour": 3600, "day": 86400}
EXPORT_CHUNK = 1000


def as_utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def bucket_start(at: dt.datetime, bucket: Bucket) -> dt.datetime:
    """The start of the hour or day (UTC) that `at` falls in."""
    at = as_utc(at)
    return (
        at.replace(minute=0, second=0, microsecond=0)
        if bucket == "hour"
        else at.replace(hour=0, minute=0, second=0, microsecond=0)
    )


@dataclass(frozen=True)
class FlowBucket:
    start: dt.datetime
    institution: str
    contributed_flops: int
    used_flops: int


def _bucket_expr(engine: Engine, column: Any, bucket: Bucket) -> ColumnElement[Any]:
    if engine.dialect.name == "sqlite":
        return func.strftime("%Y-%m-%d %H:00:00" if bucket == "hour" else "%Y-%m-%d 00:00:00", column)
    return func.date_trunc(bucket, column)


def _parse_bucket(value: Any) -> dt.datetime:
    return as_utc(value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value)))


def flow_buckets(
    engine: Engine, *, since: dt.datetime, bucket: Bucket, institution: str | None = None
) -> list[FlowBucket]:
    """Compute each institution contributed (its nodes served) and used (its requests consumed), per bucket."""
    ended = col(Receipt.ended_at)
    when = _bucket_expr(engine, ended, bucket).label("bucket")
    sides = {"provider": col(Receipt.provider), "consumer": col(Receipt.consumer)}
    sums: dict[tuple[dt.datetime, str], list[int]] = {}
    with Session(engine) as session:
        for index, side in enumerate(sides.values()):
            query = select(when, side, *exact_sum(col(Receipt.flops))).where(ended >= since).group_by(when, side)
            if institution is not None:
                query = query.where(side == institution)
            for start, name, hi, lo in session.execute(query):
                sums.setdefault((_parse_bucket(start), name), [0, 0])[index] += join(hi, lo)
    return [FlowBucket(start, name, c, u) for (start, name), (c, u) in sorted(sums.items())]


@dataclass(frozen=True)
class ReceiptFilter:
    institution: str | None = None  # either side: provider or consumer
    # "institution/node id": that member's node; a bare node id: every member's node of that id
    node: str | None = None
    session_id: str | None = None
    since: dt.datetime | None = None  # ended at or after
    until: dt.datetime | None = None  # ended before

    def apply(self, query: Select[Any]) -> Select[Any]:
        if self.institution:
            query = query.where(
                (col(Receipt.provider) == self.institution) | (col(Receipt.consumer) == self.institution)
            )
        if self.node:
            key = NodeKey.parse(self.node)
            query = query.where(col(Receipt.node_id) == key.node_id)
            if key.institution:
                query = query.where(col(Receipt.provider) == key.institution)
        if self.session_id:
            query = query.where(col(Receipt.session_id) == self.session_id)
        if self.since is not None:
            query = query.where(col(Receipt.ended_at) >= self.since)
        if self.until is not None:
            query = query.where(col(Receipt.ended_at) < self.until)
        return query


def _newest_receipts(filters: ReceiptFilter) -> Select[Any]:
    return filters.apply(select(Receipt)).order_by(col(Receipt.booked_at).desc(), col(Receipt.receipt_id))


def receipt_page(engine: Engine, filters: ReceiptFilter, *, limit: int, offset: int) -> tuple[list[Receipt], int]:
    """Newest first: one page of receipts, and how many match in all."""
    count = filters.apply(select(func.count()).select_from(Receipt))
    with Session(engine) as session:
        total = int(session.execute(count).scalar() or 0)
        rows = list(session.execute(_newest_receipts(filters).offset(offset).limit(limit)).scalars())
    return rows, total


def iter_receipts(engine: Engine, filters: ReceiptFilter, *, chunk: int = EXPORT_CHUNK) -> Iterator[Receipt]:
    """Every matching receipt, newest first, a chunk per short transaction (for CSV export)."""
    query = _newest_receipts(filters).limit(chunk)
    last: Receipt | None = None
    while True:
        page = query
        if last is not None:
            booked, rid = col(Receipt.booked_at), col(Receipt.receipt_id)
            page = query.where((booked < last.booked_at) | ((booked == last.booked_at) & (rid > last.receipt_id)))
        with Session(engine) as session:
            rows = list(session.execute(page).scalars())
        yield from rows
        if len(rows) < chunk:
            return
        last = rows[-1]


@dataclass(frozen=True)
class AuditFilter:
    action: str | None = None
    actor: str | None = None
    subject: str | None = None

    def apply(self, query: Select[Any]) -> Select[Any]:
        for column, value in (
            (col(AuditEvent.action), self.action),
            (col(AuditEvent.actor), self.actor),
            (col(AuditEvent.subject), self.subject),
        ):
            if value:
                query = query.where(column == value)
        return query


def audit_page(engine: Engine, filters: AuditFilter, *, limit: int, offset: int) -> tuple[list[AuditEvent], int]:
    """Newest first: one page of audit events, and how many match in all."""
    count = filters.apply(select(func.count()).select_from(AuditEvent))
    query = filters.apply(select(AuditEvent)).order_by(col(AuditEvent.id).desc()).offset(offset).limit(limit)
    with Session(engine) as session:
        return list(session.execute(query).scalars()), int(session.execute(count).scalar() or 0)


def iter_audit(engine: Engine, filters: AuditFilter, *, chunk: int = EXPORT_CHUNK) -> Iterator[AuditEvent]:
    """Every matching event, newest first, a chunk per short transaction (for CSV export)."""
    query = filters.apply(select(AuditEvent)).order_by(col(AuditEvent.id).desc()).limit(chunk)
    last_id: int | None = None
    while True:
        page = query if last_id is None else query.where(col(AuditEvent.id) < last_id)
        with Session(engine) as session:
            rows = list(session.execute(page).scalars())
        yield from rows
        if len(rows) < chunk:
            return
        last_id = rows[-1].id


def audit_actions(engine: Engine) -> list[str]:
    """Every action the audit log holds, for the filter's choices."""
    with Session(engine) as session:
        return sorted(session.execute(select(col(AuditEvent.action)).distinct()).scalars())


@dataclass(frozen=True)
class NodeStats:
    receipts: int
    tokens: int
    flops: int
    first_started: dt.datetime
    last_ended: dt.datetime


def node_stats(engine: Engine) -> dict[NodeKey, NodeStats]:
    """Per node, by (institution, node id): what its receipts add up to."""
    query = select(
        col(Receipt.provider),
        col(Receipt.node_id),
        func.count(),
        func.sum(col(Receipt.prefill_tokens) + col(Receipt.decode_tokens)),
        *exact_sum(col(Receipt.flops)),
        func.min(col(Receipt.started_at)),
        func.max(col(Receipt.ended_at)),
    ).group_by(col(Receipt.provider), col(Receipt.node_id))
    with Session(engine) as session:
        return {
            NodeKey(row[0], row[1]): NodeStats(
                int(row[2]), int(row[3] or 0), join(row[4], row[5]), as_utc(row[6]), as_utc(row[7])
            )
            for row in session.execute(query)
        }


def grants(engine: Engine, institution: str, *, limit: int = 50) -> list[Grant]:
    """Newest first."""
    query = (
        select(Grant)
        .where(col(Grant.institution) == institution)
        .order_by(col(Grant.created_at).desc(), col(Grant.grant_id))
        .limit(limit)
    )
    with Session(engine) as session:
        return list(session.execute(query).scalars())
