"""Receipts booked per second, on SQLite and on PostgreSQL, by batch size.

Two measurements per backend and batch size, each on a fresh database:
  book         Ledger.book() alone, on bookings checked beforehand;
  check+book   the coordinator's path: ReceiptChecker.check() on each signed receipt (ECDSA verify,
               observation lookup, countersignature), then Ledger.book() on the batch.
Both servers are durable: SQLite with synchronous=FULL (as the ledger opens it), PostgreSQL with
fsync on, a throwaway server started here (tests/pg_server.py). Each figure is the best of
--repeats runs (the least disturbed by other load). Ratios are against batch size 1.

    .venv/bin/python bench/ledger_bench.py [--receipts 1000] [--batch-sizes 1,100,500] [--repeats 3]
                                           [--backends sqlite,postgresql] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.pg_server and tests.pools

from coop.ledger.booking import ReceiptChecker
from coop.ledger.database import sqlite_url
from coop.ledger.models import Observation
from coop.ledger.store import Booking, Ledger
from coop.receipts import ReceiptBody, SignedReceipt, new_receipt_id, sign_receipt
from tests.pg_server import PostgresServer, postgres_server
from tests.pools import MemberPool, make_member_pool

T = TypeVar("T")
MODEL_HASH = "ab12"
NODES = 8  # receipts come from a handful of nodes, as in a real pool


def span_flops_per_token(start_block: int, end_block: int) -> int:
    return (end_block - start_block) * 10**9


def make_receipts(pool: MemberPool, count: int) -> tuple[list[Observation], list[SignedReceipt]]:
    """What `count` finished sessions leave: the coordinator's observations and the nodes' receipts."""
    observations, signed = [], []
    now = time.time()
    for i in range(count):
        provider, consumer = ("alpha", "beta") if i % 2 else ("beta", "alpha")
        seen = Observation(
            session_id=new_receipt_id(),
            node_id=f"{provider}-node-{i % NODES}",
            provider=provider,
            consumer=consumer,
            start_block=0,
            end_block=12,
            prefill_tokens=40,
            decode_tokens=200,
        )
        body = ReceiptBody(
            new_receipt_id(),
            pool.pool_id,
            seen.session_id,
            seen.node_id,
            provider,
            "coord",
            MODEL_HASH,
            0,
            12,
            40,
            200,
            240 * span_flops_per_token(0, 12),
            now - 10,
            now,
        )
        observations.append(seen)
        signed.append(sign_receipt(pool[provider].credentials(body.node_id), body))
    return observations, signed


def checker(pool: MemberPool, ledger: Ledger) -> ReceiptChecker:
    return ReceiptChecker(
        pool.pool_id,
        pool.info.ca_cert_pem(),
        MODEL_HASH,
        span_flops_per_token,
        pool["coord"],
        ledger.observation,
        ledger.booked_for,
    )


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextmanager
def opened(url: str) -> Iterator[Ledger]:
    ledger = Ledger.open(url)
    try:
        yield ledger
    finally:
        ledger.close()


def timed(count: int, run: Callable[[], None]) -> float:
    """Receipts per second of run(), which handles count receipts."""
    started = time.perf_counter()
    run()
    return count / (time.perf_counter() - started)


def measure(
    pool: MemberPool,
    fresh_url: Callable[[], str],
    observations: list[Observation],
    signed: list[SignedReceipt],
    bookings: list[Booking],
    size: int,
) -> tuple[float, float]:
    """(receipts/s booking only, receipts/s checking and booking), each on a fresh database."""
    with opened(fresh_url()) as ledger:

        def book() -> None:
            for batch in batches(bookings, size):
                ledger.book(batch)

        book_rate = timed(len(bookings), book)
        booked_all(ledger, len(bookings))

    with opened(fresh_url()) as ledger:
        ledger.observe(observations)
        check = checker(pool, ledger).check

        def check_and_book() -> None:
            for batch in batches(signed, size):
                ledger.book([check(s) for s in batch])

        full_rate = timed(len(signed), check_and_book)
        booked_all(ledger, len(signed))
    return book_rate, full_rate


def booked_all(ledger: Ledger, count: int) -> None:
    if len(ledger.receipts()) != count:
        raise SystemExit(f"expected {count} receipts booked, found {len(ledger.receipts())}")


def fresh_sqlite(scratch: Path) -> Callable[[], str]:
    names = (scratch / f"ledger-{i}.db" for i in range(10**9))
    return lambda: sqlite_url(next(names))


def fresh_postgresql(server: PostgresServer) -> Callable[[], str]:
    return lambda: server.url(server.create_database())


def profile_book(url: str, bookings: list[Booking], size: int) -> None:
    ledger = Ledger.open(url)
    profiler = cProfile.Profile()
    profiler.enable()
    for batch in batches(bookings, size):
        ledger.book(batch)
    profiler.disable()
    ledger.close()
    print(f"\nprofile of Ledger.book, {len(bookings)} receipts in batches of {size} (SQLite):")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receipts", type=int, default=1000, help="receipts per measurement")
    parser.add_argument("--batch-sizes", default="1,100,500")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is reported")
    parser.add_argument("--profile", action="store_true", help="cProfile Ledger.book on SQLite, batches of 100")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    backends = args.backends.split(",")
    if not set(backends) <= {"sqlite", "postgresql"}:
        parser.error("--backends: a comma-separated list of sqlite, postgresql")

    with tempfile.TemporaryDirectory(prefix="coop-ledger-bench-") as tmp, ExitStack() as stack:
        scratch = Path(tmp)
        pool = make_member_pool(scratch / "pool", "bench")
        observations, signed = make_receipts(pool, args.receipts)
        prep = Ledger.open(sqlite_url(scratch / "prep.db"))
        prep.observe(observations)
        bookings = [checker(pool, prep).check(s) for s in signed]
        prep.close()

        if args.profile:
            profile_book(sqlite_url(scratch / "profile.db"), bookings, 100)
            return

        rows = []
        for backend in backends:
            if backend == "sqlite":
                fresh_url = fresh_sqlite(scratch)
            else:
                fresh_url = fresh_postgresql(stack.enter_context(postgres_server(durable=True)))
            for size in sizes:
                runs = [measure(pool, fresh_url, observations, signed, bookings, size) for _ in range(args.repeats)]
                rows.append((backend, size, max(r[0] for r in runs), max(r[1] for r in runs)))

    print(f"\n{args.receipts} receipts per run, best of {args.repeats}, {os.cpu_count()} CPU cores, durable databases")
    print(f"{'backend':11s} {'batch':>5s} {'book receipts/s':>16s} {'vs 1':>6s} {'check+book /s':>14s} {'vs 1':>6s}")
    for backend, size, book_rate, full_rate in rows:
        base = next((r for r in rows if r[0] == backend and r[1] == 1), None)
        ratio_book = f"{book_rate / base[2]:5.1f}x" if base else "     -"
        ratio_full = f"{full_rate / base[3]:5.1f}x" if base else "     -"
        print(f"{backend:11s} {size:5d} {book_rate:16.0f} {ratio_book:>6s} {full_rate:14.0f} {ratio_full:>6s}")


if __name__ == "__main__":
    main()
