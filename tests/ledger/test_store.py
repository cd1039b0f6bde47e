"""The ledger on SQLite and PostgreSQL: schema, balanced and idempotent bookings, grants, floors, queries."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from coop.errors import InvalidInput, LedgerError
from coop.ledger.database import alembic_config
from coop.ledger.grants import AdminSigner
from coop.ledger.models import FLOPS_PER_CREDIT, POOL_ACCOUNT
from coop.ledger.store import Booking, Ledger
from coop.receipts import cert_sha256
from tests.ledger.conftest import Receipts

TABLES = {
    "institutions",
    "accounts",
    "nodes",
    "certificates",
    "observations",
    "receipts",
    "grants",
    "credit_floors",
    "postings",
    "audit_events",
    "alembic_version",
}


def schema_revision(ledger: Ledger) -> str | None:
    with ledger.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def postings_by_receipt(ledger: Ledger) -> dict[str, list[tuple[str, int]]]:
    legs: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for posting in ledger.all_postings():
        if posting.receipt_id is not None:
            legs[posting.receipt_id].append((posting.account, posting.amount_flops))
    return legs


# -- schema ------------------------------------------------------------------------------------


def test_open_migrates_an_empty_database_to_the_head_revision(ledger: Ledger) -> None:
    assert set(inspect(ledger.engine).get_table_names()) == TABLES
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert schema_revision(ledger) == head
    assert ledger.balances() == [] and ledger.receipts() == [] and ledger.audit_events() == []


def test_open_on_a_migrated_database_changes_nothing(ledger_url: str, receipts: Receipts) -> None:
    booking = receipts.booking()
    receipts.ledger.book([booking])
    revision = schema_revision(receipts.ledger)
    receipts.ledger.close()

    reopened = Ledger.open(ledger_url)
    try:
        assert schema_revision(reopened) == revision
        with reopened.engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        assert [r.receipt_id for r in reopened.receipts()] == [booking.body.receipt_id]
        assert reopened.book([booking]) == []  # the new process knows it was booked
    finally:
        reopened.close()


# -- booking -----------------------------------------------------------------------------------


def test_a_booking_credits_the_provider_exactly_and_debits_the_consumer(receipts: Receipts) -> None:
    ledger = receipts.ledger
    booking = receipts.booking("alpha", "beta", prefill_tokens=5, decode_tokens=11, blocks=(3, 9))
    body = booking.body
    assert body.flops == 16 * 6 * 1000

    assert ledger.book([booking]) == [body.receipt_id]

    assert postings_by_receipt(ledger) == {body.receipt_id: [("alpha", body.flops), ("beta", -body.flops)]}
    balances = {b.institution: b for b in ledger.balances()}
    assert set(balances) == {"alpha", "beta"}
    assert balances["alpha"].balance_flops == balances["alpha"].contributed_flops == body.flops
    assert balances["beta"].balance_flops == -body.flops and balances["beta"].used_flops == body.flops
    assert balances["alpha"].used_flops == balances["beta"].contributed_flops == 0

    [row] = ledger.receipts()
    assert (row.provider, row.consumer, row.flops, row.node_id) == ("alpha", "beta", body.flops, "n1")
    assert (row.start_block, row.end_block, row.prefill_tokens, row.decode_tokens) == (3, 9, 5, 11)
    assert row.body == booking.signed.body and row.node_signature == booking.signed.signature
    assert row.countersignature == booking.countersignature
    certificates = ledger.certificates()
    assert certificates[row.node_cert_sha256].institution == "alpha"
    assert certificates[row.coordinator_cert_sha256].institution == "coord"
    assert row.coordinator_cert_sha256 == cert_sha256(receipts.pool["coord"].cert_pem)
    [node] = ledger.nodes()
    assert (node.node_id, node.institution, node.start_block, node.end_block) == ("n1", "alpha", 3, 9)


def test_every_receipts_postings_sum_to_zero(receipts: Receipts) -> None:
    ledger = receipts.ledger
    pairs = [("alpha", "beta"), ("beta", "alpha"), ("alpha", "coord"), ("beta", "beta")]
    bookings = [receipts.booking(p, c, node_id=f"{p}-node") for p, c in pairs]
    ledger.book(bookings[:2])
    ledger.book(bookings[2:])

    legs = postings_by_receipt(ledger)
    assert set(legs) == {b.body.receipt_id for b in bookings}
    for booking in bookings:
        assert len(legs[booking.body.receipt_id]) == 2
        assert sum(amount for _, amount in legs[booking.body.receipt_id]) == 0
    assert sum(b.balance_flops for b in ledger.balances()) == 0


def test_a_receipt_is_booked_once_however_often_it_is_submitted(receipts: Receipts) -> None:
    ledger = receipts.ledger
    booking = receipts.booking()
    rid = booking.body.receipt_id

    assert ledger.book([booking, booking, booking]) == [rid]
    assert ledger.book([booking]) == []
    assert ledger.book([booking, booking]) == []

    assert [r.receipt_id for r in ledger.receipts()] == [rid]
    assert postings_by_receipt(ledger) == {rid: [("alpha", booking.body.flops), ("beta", -booking.body.flops)]}


def test_a_batch_books_only_the_receipts_not_booked_before(receipts: Receipts) -> None:
    ledger = receipts.ledger
    old = [receipts.booking() for _ in range(3)]
    new = [receipts.booking("beta", "alpha", node_id="n2") for _ in range(2)]
    ledger.book(old[:2])

    booked = ledger.book([old[0], new[0], old[1], old[2], new[1], new[0]])

    assert booked == [new[0].body.receipt_id, old[2].body.receipt_id, new[1].body.receipt_id]
    legs = postings_by_receipt(ledger)
    assert set(legs) == {b.body.receipt_id for b in old + new}
    assert all(len(pair) == 2 for pair in legs.values())


def test_a_failing_batch_books_nothing(receipts: Receipts) -> None:
    ledger = receipts.ledger
    good = receipts.booking()
    bad = receipts.booking(node_id="n2")
    bad = replace(bad, body=replace(bad.body, session_id=None))  # type: ignore[arg-type]  # NOT NULL: refused

    with pytest.raises(LedgerError):
        ledger.book([good, bad])

    assert ledger.receipts() == [] and list(ledger.all_postings()) == []
    assert ledger.book([good]) == [good.body.receipt_id]  # nothing half-remembered after the rollback
    assert ledger.balance("alpha") is not None


def test_a_node_row_follows_its_receipts_whatever_order_they_are_booked_in(receipts: Receipts) -> None:
    ledger = receipts.ledger
    t0 = time.time() - 100
    check = receipts.checker().check

    def signed_receipt(blocks: tuple[int, int], started: float, ended: float) -> Booking:
        return check(receipts.sign(receipts.body(receipts.observe(blocks=blocks), started_at=started, ended_at=ended)))

    newest = signed_receipt((10, 20), t0 + 40, t0 + 50)
    middle = signed_receipt((0, 10), t0 + 20, t0 + 30)
    oldest = signed_receipt((0, 10), t0, t0 + 10)

    ledger.book([middle, newest])  # a batch: the span is the newest receipt's, first_seen the earliest start
    [node] = ledger.nodes()
    assert (node.start_block, node.end_block) == (10, 20)
    assert (node.first_seen.timestamp(), node.last_seen.timestamp()) == pytest.approx((t0 + 20, t0 + 50))

    ledger.book([oldest])  # resubmitted late from a node's outbox: extends first_seen, changes nothing else
    [node] = ledger.nodes()
    assert (node.start_block, node.end_block, node.institution) == (10, 20, "alpha")
    assert (node.first_seen.timestamp(), node.last_seen.timestamp()) == pytest.approx((t0, t0 + 50))


def test_two_institutions_nodes_of_one_id_are_two_rows_each_with_its_own_span(receipts: Receipts) -> None:
    ledger = receipts.ledger
    t0 = time.time() - 100
    check = receipts.checker().check

    def signed_receipt(provider: str, blocks: tuple[int, int], ended: float) -> Booking:
        seen = receipts.observe(provider, "coord", node_id="gpu-0", blocks=blocks)
        return check(receipts.sign(receipts.body(seen, started_at=ended - 5, ended_at=ended)))

    ledger.book([signed_receipt("alpha", (0, 10), t0 + 10)])
    ledger.book([signed_receipt("beta", (10, 20), t0 + 50)])  # newer: it must not move alpha's row
    ledger.book([signed_receipt("alpha", (0, 5), t0 + 30), signed_receipt("beta", (12, 20), t0 + 40)])

    rows = {(n.institution, n.node_id): n for n in ledger.nodes()}
    assert list(rows) == [("alpha", "gpu-0"), ("beta", "gpu-0")]
    alpha, beta = rows["alpha", "gpu-0"], rows["beta", "gpu-0"]
    assert (alpha.start_block, alpha.end_block, beta.start_block, beta.end_block) == (0, 5, 10, 20)
    assert (alpha.first_seen.timestamp(), alpha.last_seen.timestamp()) == pytest.approx((t0 + 5, t0 + 30))
    assert (beta.first_seen.timestamp(), beta.last_seen.timestamp()) == pytest.approx((t0 + 35, t0 + 50))


# -- grants, floors, balances ------------------------------------------------------------------


def test_a_grant_moves_credits_from_the_pool_account_and_is_audited(ledger: Ledger, admin: AdminSigner) -> None:
    grant = ledger.grant("alpha", 5, reason="welcome", actor="admin", signer=admin)
    ledger.grant("alpha", -1.5, reason="correction", actor="admin", signer=admin)

    assert grant.flops == 5 * FLOPS_PER_CREDIT and grant.institution == "alpha"
    [alpha] = ledger.balances()
    assert alpha.institution == "alpha"
    assert alpha.balance_flops == alpha.granted_flops == 3.5 * FLOPS_PER_CREDIT
    assert alpha.balance_credits == 3.5
    assert alpha.contributed_flops == alpha.used_flops == 0
    assert ledger.pool_balance_flops() == -3.5 * FLOPS_PER_CREDIT
    legs = sorted((p.account, p.amount_flops) for p in ledger.all_postings() if p.grant_id == grant.grant_id)
    assert legs == [("alpha", 5 * FLOPS_PER_CREDIT), (POOL_ACCOUNT, -5 * FLOPS_PER_CREDIT)]
    events = ledger.audit_events(action="credits_granted")
    assert [(e.actor, e.subject, e.detail) for e in events] == [
        ("admin", "alpha", "-1.5 credits: correction"),
        ("admin", "alpha", "5 credits: welcome"),
    ]


@pytest.mark.parametrize(("credits", "reason"), [(0, "nothing"), (1e-13, "rounds to zero"), (1, " ")])
def test_a_grant_of_nothing_or_without_a_reason_is_refused(
    ledger: Ledger, admin: AdminSigner, credits: float, reason: str
) -> None:
    with pytest.raises(InvalidInput):
        ledger.grant("alpha", credits, reason=reason, actor="admin", signer=admin)
    assert ledger.balances() == [] and ledger.audit_events() == []


def test_a_credit_floor_is_set_and_removed(ledger: Ledger, admin: AdminSigner) -> None:
    ledger.grant("beta", 2, reason="start", actor="admin", signer=admin)

    ledger.set_credit_floor("beta", -10, actor="admin", signer=admin)
    assert ledger.balance("beta").credit_floor_flops == -10 * FLOPS_PER_CREDIT  # type: ignore[union-attr]
    assert ledger.credit_state("beta") == (2 * FLOPS_PER_CREDIT, -10 * FLOPS_PER_CREDIT)

    ledger.set_credit_floor("beta", None, actor="admin", signer=admin)
    assert ledger.balance("beta").credit_floor_flops is None  # type: ignore[union-attr]
    assert ledger.credit_state("beta") == (2 * FLOPS_PER_CREDIT, None)

    ledger.set_credit_floor("gamma", 0, actor="ops", signer=admin)  # an institution not seen before
    assert ledger.credit_state("gamma") == (0, 0)
    events = ledger.audit_events(action="credit_floor_set")
    assert [(e.actor, e.subject, e.detail) for e in events] == [
        ("ops", "gamma", "floor 0 credits"),
        ("admin", "beta", "no floor"),
        ("admin", "beta", "floor -10 credits"),
    ]


def test_balances_combine_receipts_and_grants_and_the_pool_balances_them(
    receipts: Receipts, admin: AdminSigner
) -> None:
    ledger = receipts.ledger
    ledger.grant("beta", 1, reason="start", actor="admin", signer=admin)
    ledger.set_credit_floor("coord", -3, actor="admin", signer=admin)
    a_to_b = receipts.booking("alpha", "beta")
    b_to_a = receipts.booking("beta", "alpha", node_id="n2", decode_tokens=3)
    ledger.book([a_to_b, b_to_a])
    f_ab, f_ba = a_to_b.body.flops, b_to_a.body.flops

    balances = {b.institution: b for b in ledger.balances()}
    assert list(balances) == sorted(balances) == ["alpha", "beta", "coord"]
    alpha, beta, coord = balances["alpha"], balances["beta"], balances["coord"]
    assert (alpha.balance_flops, alpha.contributed_flops, alpha.used_flops) == (f_ab - f_ba, f_ab, f_ba)
    assert (beta.contributed_flops, beta.used_flops, beta.granted_flops) == (f_ba, f_ab, FLOPS_PER_CREDIT)
    assert beta.balance_flops == FLOPS_PER_CREDIT + f_ba - f_ab
    assert (coord.balance_flops, coord.credit_floor_flops) == (0, -3 * FLOPS_PER_CREDIT)
    assert sum(b.balance_flops for b in balances.values()) + ledger.pool_balance_flops() == 0
    assert ledger.balance("nobody") is None


# -- reading receipts --------------------------------------------------------------------------


def test_receipts_filter_by_institution_and_time_and_page_newest_first(receipts: Receipts) -> None:
    ledger = receipts.ledger
    t0 = time.time() - 200  # after the pool's certificates were issued: receipts must end while theirs is valid
    check = receipts.checker().check
    made = {}
    for i, (provider, consumer) in enumerate([("alpha", "beta"), ("beta", "coord"), ("alpha", "alpha")] * 2):
        seen = receipts.observe(provider, consumer, node_id=f"{provider}-node")
        body = receipts.body(seen, started_at=t0 + 10 * i, ended_at=t0 + 10 * i + 5)
        made[i] = body.receipt_id
        ledger.book([check(receipts.sign(body))])  # one call each: booked_at increases with i

    newest_first = [made[i] for i in reversed(range(6))]
    assert [r.receipt_id for r in ledger.receipts()] == newest_first
    assert [r.receipt_id for r in ledger.receipts(institution="alpha")] == [made[5], made[3], made[2], made[0]]
    assert [r.receipt_id for r in ledger.receipts(institution="nobody")] == []
    since = dt.datetime.fromtimestamp(t0 + 30, dt.UTC)  # receipts 3, 4, 5 end after it
    assert [r.receipt_id for r in ledger.receipts(since=since)] == newest_first[:3]
    assert [r.receipt_id for r in ledger.receipts(institution="beta", since=since)] == [made[4], made[3]]
    assert [r.receipt_id for r in ledger.receipts(limit=2)] == newest_first[:2]
    assert [r.receipt_id for r in ledger.receipts(limit=2, offset=2)] == newest_first[2:4]
    assert [r.receipt_id for r in ledger.receipts(offset=4)] == newest_first[4:]
    assert ledger.receipts(limit=5, offset=6) == []


# -- two bookers at once -----------------------------------------------------------------------


def test_two_ledgers_booking_overlapping_batches_at_once_book_each_receipt_once(
    ledger_url: str, receipts: Receipts
) -> None:
    """Two coordinators (two engines) receive the same resubmitted receipts in different batches and orders."""
    bookings = [receipts.booking(node_id=f"n{i % 4}") for i in range(120)]
    ids = [b.body.receipt_id for b in bookings]
    first = [bookings[i : i + 20] for i in range(0, 120, 20)]
    second = [list(reversed(bookings[i : i + 15])) for i in reversed(range(0, 120, 15))]
    bookers = [Ledger.open(ledger_url), Ledger.open(ledger_url)]
    start = threading.Barrier(2, timeout=30)

    def book_all(ledger: Ledger, batches: list[list[Booking]]) -> list[str]:
        start.wait()
        return [rid for batch in batches for rid in ledger.book(batch)]

    try:
        with ThreadPoolExecutor(2) as executor:
            results = list(executor.map(book_all, bookers, [first, second]))
    finally:
        for ledger in bookers:
            ledger.close()

    assert Counter(results[0] + results[1]) == Counter(ids)  # each booked once, by one or the other
    legs = postings_by_receipt(receipts.ledger)
    assert set(legs) == set(ids)
    assert all(len(pair) == 2 and sum(a for _, a in pair) == 0 for pair in legs.values())
    assert receipts.ledger.balance("alpha").balance_flops == sum(b.body.flops for b in bookings)  # type: ignore[union-attr]
