"""The admin view of a real pool: member nodes and a coordinator started with --pool-dir, in Chromium.

Everything on the pages comes from the run itself: the coordinator's swarm view draws the coverage
map, and the balances are the receipts it collected from the nodes and booked in its ledger.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from coop.launcher import LocalPool
from coop.ledger.database import LEDGER_FILE, sqlite_url
from coop.ledger.store import Ledger
from coop.model.manifest import Manifest
from tests.browser import credits_text, launch_chromium, open_tab, shoot, sign_in
from tests.pools import make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


def test_a_real_pool_s_receipts_reach_the_view(tiny_chat_model_dir: str, tmp_path: Path) -> None:
    """Real processes: two member nodes and a coordinator with --pool-dir; its own bookings are on the pages."""
    pool_dir = tmp_path / "pool"
    disk = make_pool(pool_dir, "Real pool", ("alpha", "beta"), coordinators=("coord",), api_keys=("alpha", "beta"))
    bundles, keys = disk.bundles, disk.keys
    blocks = Manifest.load(tiny_chat_model_dir).num_blocks
    spans = {"alpha-0": f"0:{blocks // 2}", "beta-0": f"{blocks // 2}:{blocks}"}
    node_keys = {"alpha/alpha-0", "beta/beta-0"}  # as the pages name them
    requests = ["alpha", "beta", "alpha"]
    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht()
        pool.start_nodes(spans, {"alpha-0": bundles["alpha"], "beta-0": bundles["beta"]})
        disk.start_coordinator(pool, "coord", ["--receipt-interval-s", "0.5"])
        with httpx.Client(base_url=pool.url, timeout=60) as http:
            for who in requests:
                body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}
                chat = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {keys[who]}"})
                assert chat.status_code == 200, chat.text
            admin = {"Authorization": f"Bearer {disk.admin_token}"}
            wait_for(
                "the coordinator to book every receipt",
                lambda: http.get("/admin/api/receipts", headers=admin).json()["total"] >= len(requests) * len(spans),
                timeout_s=60,
            )
        ledger = Ledger.open(sqlite_url(pool_dir / LEDGER_FILE))
        try:
            balances = {b.institution: b for b in ledger.balances()}
        finally:
            ledger.close()
        assert balances["alpha"].used_flops > 0 and balances["beta"].contributed_flops > 0

        with launch_chromium() as browser, open_tab(browser, pool.url) as tab:
            sign_in(tab, disk.admin_token)
            spans_drawn = tab.page.locator("#coverage svg rect.span")
            assert {spans_drawn.nth(i).get_attribute("data-node") for i in range(spans_drawn.count())} == node_keys
            assert tab.page.locator("#coverage svg rect.gap").count() == 0
            shoot(tab, "real-pool-overview")
            tab.page.goto("/admin/institutions")
            for name, balance in balances.items():
                cell = tab.page.locator(f'tr[data-institution="{name}"] td.balance')
                assert cell.inner_text() == credits_text(balance.balance_flops), name
            shoot(tab, "real-pool-institutions")
            tab.page.goto("/admin/nodes")
            for key in node_keys:
                row = tab.page.locator(f'tr[data-node="{key}"]').inner_text()
                assert "online" in row and f"\t{len(requests)}\t" in row, row
            assert tab.problems == []
    finally:
        pool.stop()
