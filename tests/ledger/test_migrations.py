"""The migrations build exactly the tables the models declare, and carry a ledger's data across."""

from __future__ import annotations

import datetime as dt

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from coop.admin.queries import as_utc
from coop.ledger.database import _create_engine, upgrade
from coop.ledger.models import POOL_ACCOUNT
from coop.ledger.store import Ledger
from tests.ledger.conftest import Receipts
from tests.pools import MemberPool

TABLES = SQLModel.metadata.tables
OLD_NODE_SEEN = dt.datetime(2027, 1, 5, 12, tzinfo=dt.UTC)
# (account, amount) of postings written before amounts were split: signs, and values near 2^63
OLD_POSTINGS = [
    ("alpha", 123_456_789_012_345),
    ("beta", -123_456_789_012_345),
    ("alpha", 2**62 + 7),
    (POOL_ACCOUNT, -(2**62) - 7),
    ("beta", 1),
    ("alpha", -1),
]


def test_the_migrated_schema_is_the_one_the_models_declare(ledger: Ledger) -> None:
    with ledger.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
        keys = {name: inspect(connection).get_pk_constraint(name)["constrained_columns"] for name in TABLES}
    assert differences == []
    # autogenerate does not compare primary keys
    assert keys == {name: [c.name for c in table.primary_key] for name, table in TABLES.items()}


def test_upgrading_a_ledger_of_the_first_schema_keeps_every_amount_and_floor(ledger_url: str) -> None:
    engine = _create_engine(ledger_url)
    upgrade(engine, "0001")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO institutions (name, created_at, credit_floor_flops) VALUES "
                "('alpha', CURRENT_TIMESTAMP, -5000000000000000001), ('beta', CURRENT_TIMESTAMP, NULL)"
            )
        )
        for name in ("alpha", "beta", POOL_ACCOUNT):
            connection.execute(
                text("INSERT INTO accounts (name, created_at) VALUES (:name, CURRENT_TIMESTAMP)"), {"name": name}
            )
        connection.execute(
            text(
                "INSERT INTO grants (grant_id, institution, flops, reason, granted_by, created_at) VALUES "
                "('g1', 'alpha', 4611686018427387911, 'old', 'admin', CURRENT_TIMESTAMP)"
            )
        )
        for account, amount in OLD_POSTINGS:
            connection.execute(
                text(
                    "INSERT INTO postings (account, amount_flops, grant_id, created_at) "
                    "VALUES (:account, :amount, 'g1', CURRENT_TIMESTAMP)"
                ),
                {"account": account, "amount": amount},
            )
    engine.dispose()

    ledger = Ledger.open(ledger_url)
    try:
        postings = [(p.account, p.amount_flops) for p in ledger.all_postings()]
        assert postings == OLD_POSTINGS
        [grant] = ledger.grants()
        assert grant.flops == 2**62 + 7 and grant.signature == b""  # unsigned: verify will say so
        assert ledger.credit_state("alpha") == (123_456_789_012_345 + 2**62 + 6, -5_000_000_000_000_000_001)
        assert ledger.credit_state("beta")[1] is None
        assert [f.set_by for f in ledger.credit_floors()] == ["before signed floors"]
    finally:
        ledger.close()


def test_upgrading_a_ledger_keyed_by_node_id_keeps_its_nodes_and_lets_another_institution_reuse_an_id(
    ledger_url: str, member_pool: MemberPool
) -> None:
    engine = _create_engine(ledger_url)
    upgrade(engine, "0004")
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO institutions (name, created_at) VALUES ('alpha', CURRENT_TIMESTAMP)"))
        connection.execute(text("INSERT INTO accounts (name, created_at) VALUES ('alpha', CURRENT_TIMESTAMP)"))
        connection.execute(
            text(
                "INSERT INTO nodes (node_id, institution, start_block, end_block, first_seen, last_seen) "
                "VALUES ('gpu-0', 'alpha', 0, 10, :seen, :seen)"
            ),
            {"seen": OLD_NODE_SEEN},
        )
    engine.dispose()

    ledger = Ledger.open(ledger_url)
    receipts = Receipts(member_pool, ledger)
    try:
        [old] = ledger.nodes()
        assert (old.institution, old.node_id, old.start_block, old.end_block) == ("alpha", "gpu-0", 0, 10)
        ledger.book([receipts.booking("beta", "alpha", node_id="gpu-0", blocks=(10, 20))])
        spans = [(n.institution, n.node_id, n.start_block, n.end_block) for n in ledger.nodes()]
        assert spans == [("alpha", "gpu-0", 0, 10), ("beta", "gpu-0", 10, 20)]
        assert as_utc(ledger.nodes()[0].last_seen) == OLD_NODE_SEEN
    finally:
        ledger.close()
