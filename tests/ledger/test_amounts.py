"""Amounts far beyond 64 bits stay exact on SQLite and PostgreSQL: grants of 10^9 credits, sums past
2^63 FLOPs (9.2 million credits) in balances, fair-share flows, the admin view's sums and verify."""

from __future__ import annotations

import datetime as dt

import pytest

from coop.admin.queries import flow_buckets, node_stats
from coop.errors import InvalidInput
from coop.ledger.amounts import MAX_FLOPS, UNIT, join, split
from coop.ledger.grants import AdminSigner
from coop.ledger.models import FLOPS_PER_CREDIT, credits_to_flops
from coop.ledger.verify import PoolTrust, verify_ledger
from tests.ledger.conftest import Receipts

INT64 = 2**63
BILLION_CREDITS = 10**9 * FLOPS_PER_CREDIT  # 10^21 FLOPs: one grant, over a hundred times 2^63
BIG_SPAN_FLOPS_PER_TOKEN = 10**17  # 27 tokens make 2.7 * 10^18 FLOPs: four receipts pass 2^63


@pytest.mark.parametrize(
    "flops", [0, 1, -1, UNIT - 1, UNIT, -UNIT, -UNIT - 1, INT64, -INT64, 3 * 10**21 + 7, MAX_FLOPS]
)
def test_an_amount_splits_into_two_64_bit_parts_and_joins_back(flops: int) -> None:
    hi, lo = split(flops)
    assert join(hi, lo) == flops and 0 <= lo < UNIT and -INT64 <= hi < INT64


def test_an_amount_beyond_the_columns_is_refused() -> None:
    with pytest.raises(InvalidInput, match="beyond the ledger's range"):
        split(MAX_FLOPS + 1)


def test_credits_convert_to_flops_exactly_in_decimal() -> None:
    assert credits_to_flops("1000000000.000000000001") == BILLION_CREDITS + 1
    assert credits_to_flops(0.1) == 10**11 and credits_to_flops(-2.5) == -25 * 10**11
    assert credits_to_flops(1e9) == BILLION_CREDITS
    with pytest.raises(InvalidInput):
        credits_to_flops("nan")


def test_a_billion_credit_grant_and_sums_past_64_bits_are_exact(receipts: Receipts, admin: AdminSigner) -> None:
    ledger = receipts.ledger
    for _ in range(3):
        ledger.grant("beta", "1000000000.000000000001", reason="endowment", actor="admin (cli)", signer=admin)
    ledger.grant("beta", -1e9, reason="taken back", actor="admin (cli)", signer=admin)
    ledger.set_credit_floor("beta", "-5000000000.5", actor="admin (cli)", signer=admin)
    checker = receipts.checker(span_flops_per_token=lambda start, end: BIG_SPAN_FLOPS_PER_TOKEN)
    bookings = []
    for index in range(4):
        seen = receipts.observe("alpha", "coord", node_id=f"n{index}")
        body = receipts.body(seen, flops=(seen.prefill_tokens + seen.decode_tokens) * BIG_SPAN_FLOPS_PER_TOKEN)
        bookings.append(checker.check(receipts.sign(body)))
    ledger.book(bookings)
    delivered = sum(b.payment.flops for b in bookings)
    granted = 2 * BILLION_CREDITS + 3

    assert delivered > INT64 and granted > INT64
    balances = {b.institution: b for b in ledger.balances()}
    assert (balances["alpha"].balance_flops, balances["alpha"].contributed_flops) == (delivered, delivered)
    assert (balances["coord"].balance_flops, balances["coord"].used_flops) == (-delivered, delivered)
    assert (balances["beta"].balance_flops, balances["beta"].granted_flops) == (granted, granted)
    assert balances["beta"].credit_floor_flops == -5 * BILLION_CREDITS - FLOPS_PER_CREDIT // 2
    assert ledger.credit_state("beta") == (granted, -5 * BILLION_CREDITS - FLOPS_PER_CREDIT // 2)
    assert ledger.pool_balance_flops() == -granted
    assert sum(f for *_, f in ledger.flows_since(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))) == delivered
    stats = node_stats(ledger.engine)
    assert sum(s.flops for s in stats.values()) == delivered
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    buckets = flow_buckets(ledger.engine, since=since, bucket="day")
    assert sum(b.contributed_flops for b in buckets) == sum(b.used_flops for b in buckets) == delivered
    report = verify_ledger(ledger, PoolTrust.load(receipts.pool.directory))
    assert report.ok, report.problems
    assert report.balances_flops == {"alpha": delivered, "coord": -delivered, "beta": granted, "pool": -granted}
