"""A node's durable outbox of signed receipts, kept until a coordinator acknowledges them.

A receipt is written (and fsynced) when its batch closes, before anyone can ask for it, so a node
killed a moment later still has it after a restart; a coordinator that restarted simply asks
again. Booking is idempotent by receipt id, so handing a receipt out twice is harmless.

States: pending (handed out on every Receipts call by its coordinator) -> deleted when booked, or
rejected (kept for the operator to inspect, never handed out again). The outbox stays bounded:
`prune` drops rejected receipts and pending ones that no coordinator booked (its coordinator is
gone) once they are `retention_s` old, and all but the newest `max_rejected` rejected ones; it runs
when the outbox opens and after every acknowledgement.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from coop.receipts import SignedReceipt

MAX_BATCH = 500
RETENTION_S = 30 * 24 * 3600.0
MAX_REJECTED = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    receipt_id TEXT PRIMARY KEY,
    coordinator TEXT NOT NULL,
    body BLOB NOT NULL,
    signature BLOB NOT NULL,
    cert_pem BLOB NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
);
CREATE INDEX IF NOT EXISTS receipts_pending ON receipts (coordinator, state, created_at);
CREATE INDEX IF NOT EXISTS receipts_age ON receipts (state, created_at);
"""


class Outbox:
    def __init__(self, path: Path | str, *, retention_s: float = RETENTION_S, max_rejected: int = MAX_REJECTED) -> None:
        self.path = Path(path)
        self.retention_s = retention_s
        self.max_rejected = max_rejected
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self.prune()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, receipt_id: str, coordinator: str, signed: SignedReceipt) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO receipts (receipt_id, coordinator, body, signature, cert_pem, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (receipt_id, coordinator, signed.body, signed.signature, signed.cert_pem, time.time()),
            )

    def pending(self, coordinator: str, limit: int = MAX_BATCH) -> list[tuple[str, SignedReceipt]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT receipt_id, body, signature, cert_pem FROM receipts"
                " WHERE coordinator = ? AND state = 'pending' ORDER BY created_at LIMIT ?",
                (coordinator, max(1, min(limit, MAX_BATCH))),
            ).fetchall()
        return [(rid, SignedReceipt(bytes(body), bytes(sig), bytes(cert))) for rid, body, sig, cert in rows]

    def pending_ids(self, coordinator: str) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT receipt_id FROM receipts WHERE coordinator = ? AND state = 'pending'", (coordinator,)
            ).fetchall()
        return {row[0] for row in rows}

    def acknowledge(self, coordinator: str, booked: Sequence[str], rejected: Sequence[str]) -> None:
        """Only the coordinator a receipt belongs to can settle it."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "DELETE FROM receipts WHERE receipt_id = ? AND coordinator = ?", [(r, coordinator) for r in booked]
            )
            self._db.executemany(
                "UPDATE receipts SET state = 'rejected' WHERE receipt_id = ? AND coordinator = ?",
                [(r, coordinator) for r in rejected],
            )
            self._db.execute("COMMIT")
        self.prune()

    def prune(self, now: float | None = None) -> int:
        """Drop what is past retention, and the oldest rejected beyond `max_rejected`; returns how many."""
        cutoff = (time.time() if now is None else now) - self.retention_s
        with self._lock:
            self._db.execute("BEGIN")
            aged = self._db.execute("DELETE FROM receipts WHERE created_at < ?", (cutoff,)).rowcount
            excess = self._db.execute(
                "DELETE FROM receipts WHERE state = 'rejected' AND receipt_id NOT IN"
                " (SELECT receipt_id FROM receipts WHERE state = 'rejected' ORDER BY created_at DESC LIMIT ?)",
                (self.max_rejected,),
            ).rowcount
            self._db.execute("COMMIT")
        return aged + excess

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM receipts GROUP BY state").fetchall())
