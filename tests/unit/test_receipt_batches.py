"""A node's receipts per batch of steps (numbered, closed by tokens or by time, the tail at the end) and
its outbox staying bounded (acknowledged receipts gone, old and excess rejected ones pruned)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coop.model.manifest import Manifest
from coop.node.outbox import Outbox
from coop.node.receipt_batches import ReceiptWriter, SessionMeter
from coop.receipts import ReceiptBody, SignedReceipt
from tests.pools import MemberPool, make_member_pool
from tests.tiny_models import save_tiny_model

BATCH_TOKENS = 8
DAY_S = 24 * 3600.0


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    from coop.model.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    prepare(str(save_tiny_model("llama", root / "hf")), root / "coop")
    return Manifest.load(root / "coop")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> MemberPool:
    return make_member_pool(tmp_path_factory.mktemp("pool") / "pool")


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db", retention_s=7 * DAY_S, max_rejected=3)
    try:
        yield box
    finally:
        box.close()


def _writer(pool: MemberPool, outbox: Outbox, manifest: Manifest, batch_s: float = 3600.0) -> ReceiptWriter:
    credentials = pool["alpha"].credentials("n1")
    return ReceiptWriter(credentials, outbox, manifest, "n1", batch_tokens=BATCH_TOKENS, batch_s=batch_s)


def _bodies(outbox: Outbox) -> list[ReceiptBody]:
    return [ReceiptBody.from_bytes(signed.body) for _, signed in outbox.pending("coord")]


def test_batches_close_every_n_tokens_are_numbered_and_sum_to_the_work(
    pool: MemberPool, outbox: Outbox, manifest: Manifest
) -> None:
    writer = _writer(pool, outbox, manifest)
    meter, blocks = SessionMeter("coord"), (0, manifest.num_blocks)
    # a prompt, then 20 decode steps
    closed = [writer.stepped("s1", blocks, meter, tokens) for tokens in [5, *[1] * 20]]
    tail = writer.ended("s1", blocks, meter)
    bodies = _bodies(outbox)
    assert [b.batch for b in bodies] == [0, 1, 2, 3]
    assert [b.receipt_id for b in bodies] == [*(c for c in closed if c is not None), tail]
    assert [(b.prefill_tokens, b.decode_tokens) for b in bodies] == [(5, 3), (0, 8), (0, 8), (0, 1)]
    per_token = manifest.span_flops_per_token(0, manifest.num_blocks)
    assert all(b.flops == b.tokens * per_token and b.started_at <= b.ended_at for b in bodies)
    assert writer.ended("s1", blocks, meter) is None  # an empty batch is not billed


def test_a_batch_closes_after_batch_s_even_with_few_tokens(
    pool: MemberPool, outbox: Outbox, manifest: Manifest
) -> None:
    writer = _writer(pool, outbox, manifest, batch_s=1e-9)
    meter, blocks = SessionMeter("coord"), (0, manifest.num_blocks)
    assert all(writer.stepped("s1", blocks, meter, 1) is not None for _ in range(3))
    assert [(b.batch, b.decode_tokens) for b in _bodies(outbox)] == [(0, 1), (1, 1), (2, 1)]


def test_a_kill_loses_only_the_open_batch(pool: MemberPool, tmp_path: Path, manifest: Manifest) -> None:
    path = tmp_path / "killed.db"
    writer = _writer(pool, Outbox(path), manifest)
    meter, blocks = SessionMeter("coord"), (0, manifest.num_blocks)
    for _ in range(BATCH_TOKENS * 3 + 5):
        writer.stepped("s1", blocks, meter, 1)
    reopened = Outbox(path)  # what a restart finds: the writer above never closed its outbox nor its batch
    try:
        assert [(b.batch, b.tokens) for b in _bodies(reopened)] == [(i, BATCH_TOKENS) for i in range(3)]
    finally:
        reopened.close()
        writer.outbox.close()


def _add(outbox: Outbox, receipt_id: str, created_at: float) -> None:
    outbox.add(receipt_id, "coord", SignedReceipt(b"{}", b"sig", b"cert"))
    with sqlite3.connect(outbox.path) as db:
        db.execute("UPDATE receipts SET created_at = ? WHERE receipt_id = ?", (created_at, receipt_id))


def test_the_outbox_drops_acknowledged_old_and_excess_rejected_receipts(outbox: Outbox) -> None:
    now = time.time()
    for i in range(6):
        _add(outbox, f"rejected-{i}", now - i * 60)
    _add(outbox, "rejected-old", now - 8 * DAY_S)
    _add(outbox, "pending-old", now - 8 * DAY_S)
    _add(outbox, "pending", now - 6 * DAY_S)
    _add(outbox, "booked", now)
    outbox.acknowledge("coord", ["booked"], [*(f"rejected-{i}" for i in range(6)), "rejected-old"])
    # booked: gone; past the 7-day retention: gone; rejected beyond the newest three: gone
    assert _left(outbox) == {
        "rejected-0": "rejected",
        "rejected-1": "rejected",
        "rejected-2": "rejected",
        "pending": "pending",
    }
    assert outbox.prune(now + 2 * DAY_S) == 1  # a receipt no coordinator booked goes too, in the end
    assert "pending" not in _left(outbox)


def _left(outbox: Outbox) -> dict[str, str]:
    with sqlite3.connect(outbox.path) as db:
        return dict(db.execute("SELECT receipt_id, state FROM receipts").fetchall())
