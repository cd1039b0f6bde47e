"""The ledger's read side: balances derived from postings, and the rows the checks and admin pages list.

`coop.ledger.store.Ledger` inherits these; the writes live there. Reads open their own session and
never hold a transaction open longer than one query batch.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import Engine, bindparam, func, select
from sqlmodel import Session, SQLModel, col

from coop.ledger.amounts import join, split_sum
from coop.ledger.models import (
    POOL_ACCOUNT,
    AuditEvent,
    Certificate,
    CreditFloor,
    Grant,
    Institution,
    Node,
    Observation,
    Posting,
    Receipt,
    flops_to_credits,
)
from coop.swarm.node_key import NodeKey

_OBSERVATIONS = SQLModel.metadata.tables[Observation.__tablename__]
_OBSERVATION = select(_OBSERVATIONS).where(
    _OBSERVATIONS.c.session_id == bindparam("session_id"),
    _OBSERVATIONS.c.provider == bindparam("institution"),
    _OBSERVATIONS.c.node_id == bindparam("node_id"),
)


@dataclass(frozen=True)
class BookedBatch:
    """A batch already booked: its receipt, and the tokens it was paid."""

    receipt_id: str
    prefill_tokens: int
    decode_tokens: int


@dataclass(frozen=True)
class Balance:
    institution: str
    balance_flops: int
    contributed_flops: int  # credited by receipts: compute its nodes delivered
    used_flops: int  # debited by receipts: compute its requests consumed
    granted_flops: int
    credit_floor_flops: int | None

    @property
    def balance_credits(self) -> float:
        return flops_to_credits(self.balance_flops)


class LedgerQueries:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def observation(self, session_id: str, node: NodeKey) -> Observation | None:
        """Called once per receipt checked: one Core query, no transaction (half the round trips on PostgreSQL)."""
        with self.engine.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            row = connection.execute(_OBSERVATION, {"session_id": session_id, **node._asdict()}).first()
        return None if row is None else Observation(**row._mapping)

    def booked_for(self, session_id: str, node: NodeKey) -> dict[int, BookedBatch]:
        """The batches of this node's part of this session booked so far, by batch number."""
        query = select(
            col(Receipt.batch), col(Receipt.receipt_id), col(Receipt.prefill_tokens), col(Receipt.decode_tokens)
        ).where(
            col(Receipt.session_id) == session_id,
            col(Receipt.provider) == node.institution,
            col(Receipt.node_id) == node.node_id,
        )
        with Session(self.engine) as session:
            return {row[0]: BookedBatch(row[1], row[2], row[3]) for row in session.execute(query)}

    def balances(self) -> list[Balance]:
        """Every institution's balance, derived from postings (never stored); exact at any size."""
        hi, lo = col(Posting.amount_hi), col(Posting.amount_lo)
        receipt_leg = col(Posting.receipt_id).is_not(None)
        query = select(
            col(Posting.account),
            *split_sum(hi, lo),
            *split_sum(hi, lo, receipt_leg & (hi >= 0)),  # lo >= 0 always: the sign is hi's
            *split_sum(hi, lo, receipt_leg & (hi < 0)),
            *split_sum(hi, lo, col(Posting.grant_id).is_not(None)),
        ).group_by(col(Posting.account))
        with Session(self.engine) as session:
            sums = {row[0]: [join(row[i], row[i + 1]) for i in range(1, 9, 2)] for row in session.execute(query)}
            names = list(session.execute(select(col(Institution.name))).scalars())
            floors = _floors(session)
        result = []
        for name in sorted(names):
            total, contributed, used, granted = sums.get(name, [0, 0, 0, 0])
            result.append(Balance(name, total, contributed, -used, granted, floors.get(name)))
        return result

    def balance(self, institution: str) -> Balance | None:
        return next((b for b in self.balances() if b.institution == institution), None)

    def credit_state(self, institution: str) -> tuple[int, int | None]:
        """(balance, credit floor or None) in FLOPs: two cheap queries per request."""
        with Session(self.engine) as session:
            floor = session.execute(
                select(CreditFloor)
                .where(col(CreditFloor.institution) == institution)
                .order_by(col(CreditFloor.id).desc())
                .limit(1)
            ).scalar()
            return _account_balance(session, institution), None if floor is None else floor.floor_flops

    def pool_balance_flops(self) -> int:
        with Session(self.engine) as session:
            return _account_balance(session, POOL_ACCOUNT)

    def receipts(
        self,
        *,
        institution: str | None = None,
        since: dt.datetime | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Receipt]:
        """Newest first. `institution` matches either side: the provider or the consumer."""
        query = select(Receipt).order_by(col(Receipt.booked_at).desc(), col(Receipt.receipt_id))
        if institution is not None:
            query = query.where((col(Receipt.provider) == institution) | (col(Receipt.consumer) == institution))
        if since is not None:
            query = query.where(col(Receipt.ended_at) >= since)
        query = query.offset(offset)
        if limit is not None:
            query = query.limit(limit)
        with Session(self.engine) as session:
            return list(session.execute(query).scalars())

    def audit_events(self, *, limit: int | None = None, offset: int = 0, action: str | None = None) -> list[AuditEvent]:
        query = select(AuditEvent).order_by(col(AuditEvent.id).desc()).offset(offset)
        if action is not None:
            query = query.where(col(AuditEvent.action) == action)
        if limit is not None:
            query = query.limit(limit)
        with Session(self.engine) as session:
            return list(session.execute(query).scalars())

    def flows_since(self, since: dt.datetime) -> list[tuple[dt.datetime, str, str, int]]:
        """(time, provider, consumer, flops) of receipts since a time: what fair share decays. The time is
        the receipt's end, but never later than its booking: a node cannot date its work into the future."""
        query = (
            select(
                col(Receipt.ended_at),
                col(Receipt.booked_at),
                col(Receipt.provider),
                col(Receipt.consumer),
                col(Receipt.flops),
            )
            .where(col(Receipt.ended_at) >= since)
            .order_by(col(Receipt.ended_at))
        )
        with Session(self.engine) as session:
            return [(min(r[0], r[1]), r[2], r[3], int(r[4])) for r in session.execute(query)]

    def nodes(self) -> list[Node]:
        """Every node receipts were booked for, by institution, then node id."""
        with Session(self.engine) as session:
            query = select(Node).order_by(col(Node.institution), col(Node.node_id))
            return list(session.execute(query).scalars())

    def certificates(self) -> dict[str, Certificate]:
        with Session(self.engine) as session:
            return {c.sha256: c for c in session.execute(select(Certificate)).scalars()}

    def all_postings(self) -> Iterator[Posting]:
        with Session(self.engine) as session:
            query = select(Posting).order_by(col(Posting.id)).execution_options(yield_per=1000)
            yield from session.execute(query).scalars()

    def grants(self) -> list[Grant]:
        with Session(self.engine) as session:
            return list(session.execute(select(Grant).order_by(col(Grant.grant_id))).scalars())

    def credit_floors(self) -> list[CreditFloor]:
        """Every floor ever set, oldest first."""
        with Session(self.engine) as session:
            return list(session.execute(select(CreditFloor).order_by(col(CreditFloor.id))).scalars())


def _account_balance(session: Session, account: str) -> int:
    query = select(*split_sum(col(Posting.amount_hi), col(Posting.amount_lo))).where(col(Posting.account) == account)
    hi, lo = session.execute(query).one()
    return join(hi, lo)


def _floors(session: Session) -> dict[str, int | None]:
    """Each institution's floor in force: its newest signed floor."""
    newest = select(func.max(col(CreditFloor.id))).group_by(col(CreditFloor.institution))
    rows = session.execute(select(CreditFloor).where(col(CreditFloor.id).in_(newest))).scalars()
    return {row.institution: row.floor_flops for row in rows}
