"""The migrations build exactly the tables the models declare, and carry a ledger's data across."""

from __future__ import annotations

import datetime as dt

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from coop.admin.queries import as_utc
from coop.ledger.database import _create_engine, upgrade
from coop.ledger.models import POOL_ACCOUNT, Observation
from coop.ledger.queries import BookedBatch
from coop.ledger.store import Ledger
from coop.receipts import new_receipt_id
from coop.swarm.node_key import NodeKey
from tests.ledger.conftest import COORDINATOR, Receipts
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


def test_upgrading_a_ledger_keyed_by_session_and_node_id_lets_another_institution_s_node_of_that_id_bill_it(
    ledger_url: str, member_pool: MemberPool
) -> None:
    session_id = new_receipt_id()
    engine = _create_engine(ledger_url)
    upgrade(engine, "0005")
    with engine.begin() as connection:
        for name in ("alpha", COORDINATOR):
            connection.execute(
                text("INSERT INTO institutions (name, created_at) VALUES (:n, CURRENT_TIMESTAMP)"), {"n": name}
            )
            connection.execute(
                text("INSERT INTO accounts (name, created_at) VALUES (:n, CURRENT_TIMESTAMP)"), {"n": name}
            )
        connection.execute(
            text("INSERT INTO certificates (sha256, institution, pem) VALUES (:sha, 'alpha', :pem)"),
            {"sha": "c" * 64, "pem": b"old"},
        )
        connection.execute(
            text(
                "INSERT INTO observations (session_id, node_id, provider, consumer, start_block, end_block, "
                "prefill_tokens, decode_tokens, seen_at) VALUES (:s, 'gpu-0', 'alpha', :c, 0, 10, 10, 20, :at)"
            ),
            {"s": session_id, "c": COORDINATOR, "at": OLD_NODE_SEEN},
        )
        connection.execute(
            text(
                "INSERT INTO receipts (receipt_id, session_id, node_id, batch, provider, consumer, model_hash, "
                "start_block, end_block, prefill_tokens, decode_tokens, flops, started_at, ended_at, booked_at, "
                "body, node_signature, node_cert_sha256, countersignature, coordinator_cert_sha256) VALUES "
                "('r-old', :s, 'gpu-0', 0, 'alpha', :c, 'ab12', 0, 10, 10, 20, 300000, :at, :at, :at, "
                ":blob, :blob, :sha, :blob, :sha)"
            ),
            {"s": session_id, "c": COORDINATOR, "at": OLD_NODE_SEEN, "blob": b"old", "sha": "c" * 64},
        )
    engine.dispose()

    ledger = Ledger.open(ledger_url)
    receipts = Receipts(member_pool, ledger)
    alpha, beta = NodeKey("alpha", "gpu-0"), NodeKey("beta", "gpu-0")
    try:
        kept = ledger.observation(session_id, alpha)
        assert kept is not None and (kept.prefill_tokens, kept.decode_tokens) == (10, 20)
        assert ledger.booked_for(session_id, alpha) == {0: BookedBatch("r-old", 10, 20)}
        seen = Observation(
            session_id=session_id,
            node_id="gpu-0",
            provider="beta",
            consumer=COORDINATOR,
            start_block=10,
            end_block=20,
            prefill_tokens=10,
            decode_tokens=30,
        )
        ledger.observe([seen])
        body = receipts.body(seen)
        ledger.book([receipts.checker().check(receipts.sign(body))])
        assert ledger.booked_for(session_id, beta) == {0: BookedBatch(body.receipt_id, 10, 30)}
        assert ledger.booked_for(session_id, alpha) == {0: BookedBatch("r-old", 10, 20)}
        assert ledger.observation(session_id, alpha) == kept
    finally:
        ledger.close()
