"""Crash safety: kill -9 of the booking coordinator while it books 1,000 receipts from a node's outbox.

Before the kill, every receipt the node saw acknowledged must be booked exactly once and every
booking must be whole (both legs or neither); after a restart the outbox hands over the rest and
the ledger ends with all 1,000, each once, and passes `verify`.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import Session, col

from coop.launcher import LocalPool, start
from coop.ledger.database import sqlite_url
from coop.ledger.models import Posting
from coop.ledger.store import Ledger
from coop.ledger.verify import PoolTrust, verify_ledger
from coop.model.manifest import Manifest
from coop.node.outbox import Outbox
from coop.pool.api_keys import api_key_digest
from coop.pool.bundle import MemberBundle
from coop.receipts import api_key_id
from tests.ledger_seed import seeded_receipts
from tests.pools import make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow
RECEIPTS = 1000
BATCH = 200  # receipts the coordinator books and acknowledges at a time (ReceiptCollector's batch)
WAIT_S = 240.0  # generous: the 2-core CI machine runs other tests' processes too
FIRST_BATCH_PHASE_S = 0.1  # how far into the second batch a kill after the first may land (its start is unseen)
PHASE = 0.75  # a kill lands up to this part of a batch's time into the next one: it may be quicker


def _legs_per_receipt(ledger: Ledger) -> Counter[str]:
    with Session(ledger.engine) as session:
        query = select(col(Posting.receipt_id)).where(col(Posting.receipt_id).is_not(None))
        return Counter(session.execute(query).scalars())


def test_kill_9_while_booking_loses_nothing_and_books_nothing_twice(tiny_chat_model_dir: str, tmp_path: Path) -> None:
    pool_dir = tmp_path / "pool"
    disk = make_pool(pool_dir, "Crash pool", ("Alpha", "Gamma"), coordinators=("Coord",), api_keys=("Gamma",))
    bundles = disk.bundles
    manifest = Manifest.load(tiny_chat_model_dir)
    alpha = MemberBundle.load(bundles["Alpha"])
    gamma_key = api_key_id(api_key_digest(disk.keys["Gamma"]))  # the key Gamma's requests came with
    flops_per_token = manifest.span_flops_per_token(0, manifest.num_blocks)
    seeds = seeded_receipts(
        alpha,
        coordinator="Coord",
        consumer="Gamma",
        api_key_id=gamma_key,
        model_hash=manifest.content_hash,
        node_id="node-a",
        span=(0, manifest.num_blocks),
        flops_per_token=flops_per_token,
        count=RECEIPTS,
    )
    ledger = Ledger.open(sqlite_url(pool_dir / "ledger.db"))
    ledger.observe([s.observation for s in seeds])  # what the coordinator saw before it went down
    outbox = Outbox(bundles["Alpha"].with_suffix(".outbox.db"))
    for s in seeds:
        outbox.add(s.body.receipt_id, "Coord", s.signed)
    all_ids = {s.body.receipt_id for s in seeds}

    def pending_ids() -> set[str]:
        return outbox.pending_ids("Coord")

    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht()
        pool.start_nodes({"node-a": f"0:{manifest.num_blocks}"}, {"node-a": bundles["Alpha"]})
        args = ["coordinator", "start", "--model", tiny_chat_model_dir, "--port", "0", "--initial-peers", pool.peer]
        args += ["--member", str(bundles["Coord"]), "--pool-dir", str(pool_dir), "--receipt-interval-s", "0.2"]
        booker = start("booker", [*args, "--device", "cpu"], None)
        pool.processes.append(booker)
        # The kill point: after a random number of acknowledged batches (the final batch always still
        # ahead), then a random part of the next batch's time: fetching, checking or booking it.
        acks: list[tuple[float, int]] = []  # (when, receipts acknowledged) each time that count went up

        def acknowledged_count() -> int:
            count = RECEIPTS - outbox.counts().get("pending", 0)
            if not acks or count > acks[-1][1]:
                acks.append((time.monotonic(), count))
            return count

        kill_after = random.randint(1, RECEIPTS // BATCH - 1) * BATCH
        wait_for(f"{kill_after} acknowledged receipts", lambda: acknowledged_count() >= kill_after, WAIT_S, 0.005)
        phase_s = PHASE * (acks[-1][0] - acks[-2][0]) if len(acks) >= 3 else FIRST_BATCH_PHASE_S
        time.sleep(random.uniform(0.0, phase_s))
        booker.kill_hard()

        acknowledged = all_ids - pending_ids()
        legs = _legs_per_receipt(ledger)
        booked = {r.receipt_id for r in ledger.receipts()}
        print(f"killed with {len(acknowledged)} receipts acknowledged, {len(booked)} booked (aimed: {kill_after})")
        assert 0 < len(acknowledged) < RECEIPTS, "the kill must land in the middle of booking"
        assert acknowledged <= booked, "a receipt was acknowledged but is not in the ledger"
        assert set(legs) == booked and set(legs.values()) == {2}, "a booking is half-written"
        report = verify_ledger(ledger, PoolTrust.load(pool_dir))
        assert report.ok, report.problems

        pool.start_coordinator(
            member=bundles["Coord"], extra_args=["--pool-dir", str(pool_dir), "--receipt-interval-s", "0.2"]
        )
        wait_for("the outbox to empty", lambda: not pending_ids(), WAIT_S, every_s=0.1)
        legs = _legs_per_receipt(ledger)
        assert set(legs) == all_ids and set(legs.values()) == {2}
        balances = {b.institution: b.balance_flops for b in ledger.balances()}
        assert balances["Alpha"] == RECEIPTS * 8 * flops_per_token == -balances["Gamma"]
        report = verify_ledger(ledger, PoolTrust.load(pool_dir))
        assert report.ok and report.receipts == RECEIPTS, report.problems
    finally:
        pool.stop()
        outbox.close()
        ledger.close()
