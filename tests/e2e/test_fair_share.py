"""Fair share with real processes: contribution 2:1 over the decay window -> served tokens 2:1 under load.

Uni A's nodes delivered twice the compute of Uni B's (booked receipts from the past hour). A
coordinator that runs one session at a time is flooded by both; over the window, their served
tokens must come out 2:1 within 10%. Newcomer, which has only ever consumed (fair-share factor
near 0), asks alone once the pool is idle again, and starts at once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from coop.coordinator.http.app import QUEUE_HEADER
from coop.launcher import LocalPool
from coop.ledger.booking import ReceiptChecker
from coop.ledger.database import sqlite_url
from coop.ledger.store import Ledger
from coop.model.manifest import Manifest
from coop.pool.bundle import MemberBundle
from tests.ledger_seed import seeded_receipts
from tests.pools import make_pool

pytestmark = pytest.mark.slow
CLIENTS_PER_INSTITUTION = 3
MEASURED_REQUESTS = 90
WINDOW_LIMIT_S = 150.0


def _book_history(pool_dir: Path, bundles: dict[str, Path], manifest: Manifest) -> None:
    """Uni A delivered 2 units of compute, Uni B 1, all of it consumed by Newcomer, just before the pool opened
    (after its certificates were issued: a receipt counts only if its signer's certificate was valid then)."""
    coord = MemberBundle.load(bundles["Coord"])
    ledger = Ledger.open(sqlite_url(pool_dir / "ledger.db"))
    span = (0, manifest.num_blocks)
    flops = manifest.span_flops_per_token(*span)
    checker = ReceiptChecker(
        coord.pool_id,
        coord.ca_cert_pem,
        manifest.content_hash,
        manifest.span_flops_per_token,
        coord,
        ledger.observation,
        ledger.booked_for,
    )
    for provider, sessions in (("Uni A", 40), ("Uni B", 20)):
        seeds = seeded_receipts(
            MemberBundle.load(bundles[provider]),
            coordinator="Coord",
            consumer="Newcomer",
            model_hash=manifest.content_hash,
            node_id=f"old-{provider[-1].lower()}",
            span=span,
            flops_per_token=flops,
            count=sessions,
            ended_at=time.time() - 120,
        )
        ledger.observe([s.observation for s in seeds])
        ledger.book([checker.check(s.signed) for s in seeds])
    ledger.close()


def test_saturated_pool_serves_in_proportion_to_contribution(tiny_chat_model_dir: str, tmp_path: Path) -> None:
    pool_dir = tmp_path / "pool"
    consumers = ("Uni A", "Uni B", "Newcomer")
    disk = make_pool(pool_dir, "Fair pool", ("Host", *consumers), coordinators=("Coord",), api_keys=consumers)
    bundles, keys = disk.bundles, disk.keys
    manifest = Manifest.load(tiny_chat_model_dir)
    _book_history(pool_dir, bundles, manifest)

    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht()
        pool.start_nodes({"host": f"0:{manifest.num_blocks}"}, {"host": bundles["Host"]})
        disk.start_coordinator(pool, "Coord", ["--max-active-sessions", "1"])

        def chat(http: httpx.Client, institution: str, text: str) -> httpx.Response:
            body = {"model": manifest.name, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
            headers = {"Authorization": f"Bearer {keys[institution]}"}
            response = http.post(f"{pool.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
            assert response.status_code == 200, response.text
            return response

        served: Counter[str] = Counter()
        queued: Counter[str] = Counter()
        completed = 0
        lock = threading.Lock()
        stop = threading.Event()
        errors: list[BaseException] = []

        def flood(institution: str) -> None:
            with httpx.Client() as http:
                while not stop.is_set():
                    try:
                        response = chat(http, institution, "Tell me about sharing.")
                    except BaseException as exc:
                        errors.append(exc)
                        return
                    usage = response.json()["usage"]
                    with lock:
                        nonlocal completed
                        if stop.is_set():
                            return  # finished after the window closed: not counted
                        # the prompt once, then one step per generated token but the last
                        served[institution] += usage["prompt_tokens"] + usage["completion_tokens"] - 1
                        queued[institution] += float(response.headers[QUEUE_HEADER]) > 0
                        completed += 1
                        if completed >= MEASURED_REQUESTS:
                            stop.set()

        threads = [
            threading.Thread(target=flood, args=(name,), daemon=True)
            for name in ("Uni A", "Uni B")
            for _ in range(CLIENTS_PER_INSTITUTION)
        ]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        stop.wait(WINDOW_LIMIT_S)
        print(f"window {time.monotonic() - began:.1f} s, served {dict(served)}, queued {dict(queued)}")
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        if errors:
            print("\n".join(pool.processes[-1].lines[-60:]))
        assert not errors, errors
        assert completed >= MEASURED_REQUESTS, f"only {completed} requests in {WINDOW_LIMIT_S} s"
        assert queued["Uni A"] > 0 and queued["Uni B"] > 0, "the pool was not saturated"
        ratio = served["Uni A"] / served["Uni B"]
        assert 1.8 <= ratio <= 2.2, f"served tokens A:B = {served['Uni A']}:{served['Uni B']} = {ratio:.2f}, want 2±10%"

        with httpx.Client() as http:  # the pool is idle again: the lowest priority of all starts at once
            lone = chat(http, "Newcomer", "Anyone there?")
        assert float(lone.headers[QUEUE_HEADER]) == 0.0
        assert lone.json()["choices"][0]["message"]["content"] is not None
    finally:
        pool.stop()
