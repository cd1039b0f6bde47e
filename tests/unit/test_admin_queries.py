"""The admin view's read-only ledger queries, against a ledger filled through the real booking path."""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterator

import pytest

from coop.admin import queries
from coop.admin.export import audit_csv, cell, receipts_csv
from coop.admin.queries import AuditFilter, ReceiptFilter, as_utc, bucket_start
from coop.swarm.node_key import NodeKey
from tests.admin_pool import MEMBERS, AdminPool, build_admin_pool


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def data(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminPool]:
    """The same queries on both stores: hour and day buckets are dialect-specific SQL."""
    root = tmp_path_factory.mktemp("admin-queries")
    if request.param == "sqlite":
        pool = build_admin_pool(root)
        try:
            yield pool
        finally:
            pool.ledger.close()
        return
    server = request.getfixturevalue("postgres")
    database = server.create_database()
    try:
        pool = build_admin_pool(root, ledger_url=server.url(database))
        try:
            yield pool
        finally:
            pool.ledger.close()
    finally:
        server.drop_database(database)


def test_flow_buckets_sum_contribution_and_usage_per_institution_and_hour(data: AdminPool) -> None:
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    flows = queries.flow_buckets(data.ledger.engine, since=since, bucket="hour")
    expected: dict[tuple[dt.datetime, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in data.ledger.receipts():
        hour = bucket_start(r.ended_at, "hour")
        expected[hour, r.provider][0] += r.flops
        expected[hour, r.consumer][1] += r.flops
    assert {(f.start, f.institution): [f.contributed_flops, f.used_flops] for f in flows} == dict(expected)
    assert all(f.start.tzinfo is dt.UTC and f.start.minute == 0 for f in flows)

    days = queries.flow_buckets(data.ledger.engine, since=since, bucket="day", institution="beta-lab")
    assert {f.institution for f in days} == {"beta-lab"}
    balance = data.ledger.balance("beta-lab")
    assert balance is not None
    assert sum(f.contributed_flops for f in days) == balance.contributed_flops
    assert sum(f.used_flops for f in days) == balance.used_flops


def test_receipt_pages_filter_count_and_do_not_overlap(data: AdminPool) -> None:
    everything = data.ledger.receipts()
    engine = data.ledger.engine
    first, total = queries.receipt_page(engine, ReceiptFilter(), limit=40, offset=0)
    second, _ = queries.receipt_page(engine, ReceiptFilter(), limit=40, offset=40)
    assert total == len(everything)
    assert not {r.receipt_id for r in first} & {r.receipt_id for r in second}
    assert [as_utc(r.booked_at) for r in first] == sorted((as_utc(r.booked_at) for r in first), reverse=True)

    newest = everything[0]
    node = f"{newest.provider}/{newest.node_id}"
    rows, total = queries.receipt_page(engine, ReceiptFilter(node=node), limit=1000, offset=0)
    assert total == len(rows) == sum(1 for r in everything if f"{r.provider}/{r.node_id}" == node)

    rows, total = queries.receipt_page(engine, ReceiptFilter(institution="gamma-institute"), limit=1000, offset=0)
    assert total == sum(1 for r in everything if "gamma-institute" in (r.provider, r.consumer))

    session = everything[-1].session_id
    rows, _ = queries.receipt_page(engine, ReceiptFilter(session_id=session), limit=1000, offset=0)
    assert {r.session_id for r in rows} == {session} and len(rows) >= 1

    middle = sorted(as_utc(r.ended_at) for r in everything)[len(everything) // 2]
    older, n_older = queries.receipt_page(engine, ReceiptFilter(until=middle), limit=1000, offset=0)
    newer, n_newer = queries.receipt_page(engine, ReceiptFilter(since=middle), limit=1000, offset=0)
    assert n_older + n_newer == len(everything)
    assert all(as_utc(r.ended_at) < middle for r in older) and all(as_utc(r.ended_at) >= middle for r in newer)


def test_exports_stream_every_matching_row_in_page_order(data: AdminPool) -> None:
    engine = data.ledger.engine
    filters = ReceiptFilter(institution="alpha-university")
    paged, total = queries.receipt_page(engine, filters, limit=10_000, offset=0)
    streamed = list(queries.iter_receipts(engine, filters, chunk=7))  # many chunks, some sharing a booked_at
    assert [r.receipt_id for r in streamed] == [r.receipt_id for r in paged] and len(streamed) == total

    lines = "".join(receipts_csv(data.context(), filters)).splitlines()
    assert len(lines) == total + 1 and lines[0].startswith("receipt_id,session_id,node_id,provider,consumer")

    events = data.ledger.audit_events()
    assert [e.id for e in queries.iter_audit(engine, AuditFilter(), chunk=2)] == [e.id for e in events]
    lines = "".join(audit_csv(data.context(), AuditFilter(action="credits_granted"))).splitlines()
    assert len(lines) == 1 + sum(1 for e in events if e.action == "credits_granted")


def test_audit_pages_filter_by_action_actor_and_subject(data: AdminPool) -> None:
    engine = data.ledger.engine
    rows, total = queries.audit_page(engine, AuditFilter(action="credits_granted"), limit=2, offset=0)
    assert len(rows) == 2 and total == len(MEMBERS) + 1
    rows, total = queries.audit_page(engine, AuditFilter(subject="beta-lab"), limit=50, offset=0)
    assert total == 1 and rows[0].actor == "admin (cli)"
    rows, total = queries.audit_page(engine, AuditFilter(actor="nobody"), limit=50, offset=0)
    assert (rows, total) == ([], 0)
    assert "credits_granted" in queries.audit_actions(engine)


def test_node_stats_add_up_each_node_s_receipts(data: AdminPool) -> None:
    stats = queries.node_stats(data.ledger.engine)
    receipts = data.ledger.receipts()
    assert Counter(NodeKey(r.provider, r.node_id) for r in receipts) == {node: s.receipts for node, s in stats.items()}
    for node, s in stats.items():
        mine = [r for r in receipts if (r.provider, r.node_id) == node]
        assert s.flops == sum(r.flops for r in mine)
        assert s.tokens == sum(r.prefill_tokens + r.decode_tokens for r in mine)
        assert s.last_ended == max(as_utc(r.ended_at) for r in mine)


def test_grants_newest_first(data: AdminPool) -> None:
    rows = queries.grants(data.ledger.engine, "alpha-university")
    assert [g.reason for g in rows][-1] == "sign-up credit"


def test_csv_cells_that_a_spreadsheet_would_run_are_defused() -> None:
    assert [cell(v) for v in ("=HYPERLINK(1)", "+1", "-2", "@x", "plain", -3, 1.5)] == [
        "'=HYPERLINK(1)",
        "'+1",
        "'-2",
        "'@x",
        "plain",
        "-3",
        "1.5",
    ]


def test_times_without_a_zone_are_utc() -> None:
    naive = dt.datetime(2025, 1, 2, 3, 4, 5)
    assert as_utc(naive) == dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert bucket_start(naive, "day") == dt.datetime(2025, 1, 2, tzinfo=dt.UTC)
