"""The migrations build exactly the tables the models declare, and carry a ledger's data across."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlmodel import SQLModel

from coop.ledger.database import _create_engine, upgrade
from coop.ledger.models import POOL_ACCOUNT
from coop.ledger.store import Ledger

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
    assert differences == []


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
