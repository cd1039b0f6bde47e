"""The admin view's nodes: a node is its (institution, node id), so two members' nodes of one id are two rows."""

from __future__ import annotations

import time
from pathlib import Path

from coop.admin import AdminContext, queries, views
from coop.admin.queries import ReceiptFilter
from coop.ledger.database import sqlite_url
from coop.ledger.store import Ledger
from coop.swarm.announcement import SERVING, NodeAnnouncement, sign_announcement
from coop.swarm.node_key import NodeKey, key_of
from tests.admin_pool import StaticSwarm
from tests.ledger.conftest import MODEL_HASH, Receipts
from tests.pools import MemberPool

NUM_BLOCKS = 10
SHARED_ID = "gpu-0"  # both members minted it


def _announcement(pool: MemberPool, institution: str, blocks: tuple[int, int]) -> NodeAnnouncement:
    now = time.time()
    unsigned = NodeAnnouncement(
        node_id=SHARED_ID,
        pool_id=pool.pool_id,
        model_hash=MODEL_HASH,
        start=blocks[0],
        end=blocks[1],
        endpoint="127.0.0.1:31330",
        institution=institution,
        throughput_tps=10.0,
        free_cache_bytes=2**30,
        state=SERVING,
        announced_at=now,
        expires_at=now + 9,
    )
    return sign_announcement(pool[institution].credentials(SHARED_ID), unsigned)


def test_two_members_nodes_of_one_id_are_two_rows_each_with_its_own_receipts_and_sessions(
    tmp_path: Path, member_pool: MemberPool
) -> None:
    ledger = Ledger.open(sqlite_url(tmp_path / "ledger.db"))
    receipts = Receipts(member_pool, ledger)
    try:
        ledger.book([receipts.booking("alpha", "beta", node_id=SHARED_ID, blocks=(0, 4))])
        for _ in range(2):
            ledger.book([receipts.booking("beta", "alpha", node_id=SHARED_ID, blocks=(4, NUM_BLOCKS))])
        online = _announcement(member_pool, "alpha", (0, 4))  # alpha's is online, beta's only in the ledger
        swarm = StaticSwarm(NUM_BLOCKS, [online], [[key_of(online)]])
        context = AdminContext(pool_dir=member_pool.directory, ledger=ledger, swarm=swarm)

        listed = views.node_list(context, views.Live.snapshot(context))

        rows = {(n.institution, n.node_id): n for n in listed}
        assert list(rows) == [("alpha", SHARED_ID), ("beta", SHARED_ID)]
        alpha, beta = rows["alpha", SHARED_ID], rows["beta", SHARED_ID]
        assert (alpha.online, alpha.receipts, alpha.start, alpha.end, alpha.sessions) == (True, 1, 0, 4, 1)
        assert (beta.online, beta.receipts, beta.start, beta.end, beta.sessions) == (False, 2, 4, NUM_BLOCKS, 0)

        engine = ledger.engine
        betas, total = queries.receipt_page(engine, ReceiptFilter(node=str(beta.key)), limit=10, offset=0)
        assert total == 2 and {(r.provider, r.node_id) for r in betas} == {("beta", SHARED_ID)}
        _, either = queries.receipt_page(engine, ReceiptFilter(node=SHARED_ID), limit=10, offset=0)
        assert either == 3  # a bare id: every member's node of that id
        assert set(queries.node_stats(engine)) == {NodeKey("alpha", SHARED_ID), NodeKey("beta", SHARED_ID)}
    finally:
        ledger.close()
