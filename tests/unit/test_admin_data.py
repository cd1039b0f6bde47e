"""The admin view's test pool (tests/admin_pool.py) holds what the admin view's tests assume."""

from __future__ import annotations

from pathlib import Path

from coop.ledger.models import FLOPS_PER_CREDIT
from tests.admin_pool import LIVE_NODES, MEMBERS, OFFLINE_NODE, SESSIONS, XSS_NAME, build_admin_pool

# ------------------------------------------------------------------------------------------------ checks


def test_the_booked_data_balances(tmp_path: Path) -> None:
    data = build_admin_pool(tmp_path)
    try:
        receipts = data.ledger.receipts()
        assert len(receipts) == len(data.booked) > SESSIONS
        balances = {b.institution: b for b in data.ledger.balances()}
        assert set(balances) == {*MEMBERS, XSS_NAME}
        assert sum(b.balance_flops for b in balances.values()) + data.ledger.pool_balance_flops() == 0
        for name in MEMBERS:
            b = balances[name]
            assert b.granted_flops == 100 * FLOPS_PER_CREDIT
            assert b.balance_flops == b.granted_flops + b.contributed_flops - b.used_flops
            assert b.used_flops > 0
        assert {r.node_id for r in receipts} >= {*LIVE_NODES, OFFLINE_NODE[0]}
    finally:
        data.ledger.close()
