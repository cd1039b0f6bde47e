"""The ledger with real processes: signed receipts from two providers, one paying client, exact books.

Pool "books": Alpha serves blocks 0:2 and Beta 2:4 of a tiny 4-block chat model, the coordinator
belongs to Coord, and Gamma's API key pays for every request. Receipts travel from each node's
outbox to the coordinator, which checks, countersigns and books them in SQLite in the pool
directory; the test reads that database directly and runs `coop ledger verify` on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from coop.launcher import COOP, LocalPool
from coop.ledger.models import Observation, Receipt
from coop.ledger.store import Ledger
from coop.model.manifest import Manifest
from coop.node.outbox import Outbox
from coop.pool.bundle import MemberBundle
from coop.receipts import ReceiptBody, SignedReceipt, new_receipt_id, sign_receipt
from tests.pools import ServedPool, make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow
WAIT_S = 30.0
PROMPTS = ["Count to three.", "Name a colour.", "Say hello to the pool."]


class BooksPool(ServedPool):
    def outbox(self, institution: str) -> Outbox:
        return Outbox(self.bundles[institution].with_suffix(".outbox.db"))

    def start_coordinator(self, receipt_interval_s: float = 0.3) -> None:
        self.pool.start_coordinator(
            member=self.bundles["Coord"],
            api_keys=self.pool_dir / "api_keys.json",
            extra_args=["--pool-dir", str(self.pool_dir), "--receipt-interval-s", str(receipt_interval_s)],
        )

    def chat(self, content: str, max_tokens: int = 6) -> dict:  # type: ignore[type-arg]
        body = {
            "model": self.manifest.name,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        }
        headers = {"Authorization": f"Bearer {self.key}"}
        response = httpx.post(f"{self.pool.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def books(tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BooksPool]:
    pool_dir = tmp_path_factory.mktemp("books") / "pool"
    disk = make_pool(pool_dir, "Books pool", ("Alpha", "Beta", "Gamma"), coordinators=("Coord",), api_keys=("Gamma",))
    bundles, key = disk.bundles, disk.keys["Gamma"]
    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht()
        members = {"node-a": bundles["Alpha"], "node-b": bundles["Beta"]}
        pool.start_nodes({"node-a": "0:2", "node-b": "2:4"}, members, extra_args=["--metrics-port", "0"])
        books = BooksPool(pool, pool_dir, bundles, key, Manifest.load(tiny_chat_model_dir))
        books.start_coordinator()
        yield books
    finally:
        pool.stop()


def _verify(pool_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COOP, "ledger", "verify", "--pool", str(pool_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_providers_are_credited_exactly_what_they_computed(books: BooksPool) -> None:
    ledger = books.ledger
    before = {b.institution: b for b in ledger.balances()}
    receipts_before = len(ledger.receipts())
    # Each request runs its prompt as one step, then one step per generated token but the last.
    tokens = 0
    for prompt in PROMPTS:
        usage = books.chat(prompt)["usage"]
        tokens += usage["prompt_tokens"] + usage["completion_tokens"] - 1
    wait_for("two receipts per request", lambda: len(ledger.receipts()) >= receipts_before + 2 * len(PROMPTS), WAIT_S)

    after = {b.institution: b for b in ledger.balances()}

    def gained(name: str) -> int:
        return after[name].balance_flops - (before[name].balance_flops if name in before else 0)

    alpha_flops = tokens * books.manifest.span_flops_per_token(0, 2)
    beta_flops = tokens * books.manifest.span_flops_per_token(2, 4)
    assert gained("Alpha") == alpha_flops
    assert gained("Beta") == beta_flops
    assert gained("Gamma") == -(alpha_flops + beta_flops)
    assert "Coord" not in after or gained("Coord") == 0
    assert sum(b.balance_flops for b in after.values()) + ledger.pool_balance_flops() == 0
    new = ledger.receipts(limit=2 * len(PROMPTS))
    assert {r.provider for r in new} == {"Alpha", "Beta"} and {r.consumer for r in new} == {"Gamma"}
    result = _verify(books.pool_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ledger OK" in result.stdout


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
DASHBOARD = Path(__file__).parents[2] / "docker" / "grafana" / "coop-dashboard.json"


def _scrape(url: str) -> Samples:
    """Every sample of a /metrics page, parsed as Prometheus parses it: (name, labels) -> value."""
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    families = text_string_to_metric_families(response.text)
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_move_as_requests_are_served(books: BooksPool) -> None:
    """The nodes' and the coordinator's /metrics, scraped around one chat and one refused request."""
    node_urls = {name: books.pool.nodes[name].ready["metrics_url"] for name in ("node-a", "node-b")}
    coordinator_url = f"{books.pool.url}/metrics"
    nodes_before = {name: _scrape(url) for name, url in node_urls.items()}
    before = _scrape(coordinator_url)
    answer = books.chat("Name a colour.")
    usage, finish = answer["usage"], answer["choices"][0]["finish_reason"]
    refused = httpx.post(
        f"{books.pool.url}/v1/chat/completions", json={}, headers={"Authorization": "Bearer nope"}, timeout=30
    )
    assert refused.status_code == 401
    after = _scrape(coordinator_url)

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    chat = {"endpoint": "/v1/chat/completions", "status": "200"}
    assert moved("coop_coordinator_http_requests_total", **chat) == 1
    assert moved("coop_coordinator_http_requests_total", endpoint="other", status="401") == 1
    assert moved("coop_coordinator_rejections_total", reason="invalid_api_key") == 1
    assert moved("coop_coordinator_generations_total", outcome=finish) == 1
    assert moved("coop_coordinator_time_to_first_token_seconds_count") == 1
    assert moved("coop_coordinator_time_per_output_token_seconds_count") == (usage["completion_tokens"] > 1)
    assert moved("coop_coordinator_queue_wait_seconds_count") == 1
    assert moved("coop_coordinator_prompt_tokens_total") == usage["prompt_tokens"]
    assert moved("coop_coordinator_completion_tokens_total") == usage["completion_tokens"]
    assert moved("coop_coordinator_route_hops_total", node_id="node-a", institution="Alpha") == 1
    assert moved("coop_coordinator_route_hops_total", node_id="node-b", institution="Beta") == 1
    assert moved("coop_coordinator_failovers_total") == 0

    steps = usage["completion_tokens"]  # the prompt in one step, then one per generated token but the last
    for name, url in node_urls.items():
        now, then = _scrape(url), nodes_before[name]
        for counter in ("coop_node_steps_total", "coop_node_step_seconds_count"):
            assert _value(now, counter) - _value(then, counter) == steps, (name, counter)
        sent = "coop_node_pushes_total" if name == "node-a" else "coop_node_results_total"
        assert _value(now, sent) - _value(then, sent) == steps, name
        assert _value(now, "coop_node_kv_cache_budget_bytes") > 0

    booked = _value(before, "coop_coordinator_receipts_booked_total") + 2  # one per node of the route
    wait_for(
        "the coordinator to book both receipts",
        lambda: _value(_scrape(coordinator_url), "coop_coordinator_receipts_booked_total") >= booked,
        WAIT_S,
    )
    for name, url in node_urls.items():
        wait_for(
            f"{name}'s outbox to empty", lambda url=url: _value(_scrape(url), "coop_node_receipts_pending") == 0, WAIT_S
        )
    factors = {
        dict(labels)["institution"]: value
        for (name, labels), value in _scrape(coordinator_url).items()
        if name == "coop_coordinator_fair_share_factor"
    }
    assert factors["Gamma"] < factors["Alpha"]  # Gamma only used the pool, Alpha contributed


def test_every_metric_the_dashboard_shows_is_served(books: BooksPool) -> None:
    """The Grafana dashboard parses, and each metric its queries name is in a live pool's /metrics."""
    served = {
        name
        for url in [f"{books.pool.url}/metrics", *(n.ready["metrics_url"] for n in books.pool.nodes.values())]
        for name, _ in _scrape(url)
    }
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"\bcoop_[a-z_]+", target["expr"])
    }
    assert len(queried) >= 6
    assert queried <= served, f"the dashboard queries metrics no process serves: {sorted(queried - served)}"


def test_a_resubmitted_receipt_is_booked_once(books: BooksPool) -> None:
    receipt = _fresh_receipt(books, "Once more.")
    ledger = books.ledger
    balance = ledger.balance("Alpha")
    outbox = books.outbox("Alpha")
    node_cert = ledger.certificates()[receipt.node_cert_sha256].pem  # what signed it: node-a's own certificate
    signed = SignedReceipt(receipt.body, receipt.node_signature, node_cert)
    for _ in range(3):  # as if the node never heard the acknowledgement, three times over
        outbox.add(receipt.receipt_id, "Coord", signed)
        wait_for("the resubmission to be acknowledged", lambda: not _pending(outbox), WAIT_S)
    assert len([r for r in ledger.receipts() if r.receipt_id == receipt.receipt_id]) == 1
    assert ledger.balance("Alpha") == balance
    assert outbox.counts().get("rejected", 0) == 0  # acknowledged as booked, each time


def test_altered_receipts_are_rejected_and_audited(books: BooksPool) -> None:
    genuine = _fresh_receipt(books, "Something to sign.")
    ledger = books.ledger
    body = ReceiptBody.from_bytes(genuine.body)
    # the nodes' own keys: signed by a member certificate, every receipt would fail one check alone
    alpha, beta = (MemberBundle.load(books.bundles[name]).credentials(body.node_id) for name in ("Alpha", "Beta"))
    span_flops = books.manifest.span_flops_per_token(0, 2)

    def variant(**changes: object) -> ReceiptBody:
        """A new receipt like the genuine one, FLOPs consistent with its tokens."""
        fresh = dataclasses.replace(body, receipt_id=new_receipt_id(), **changes)  # type: ignore[arg-type]
        return dataclasses.replace(fresh, flops=fresh.tokens * span_flops)

    inflated = sign_receipt(alpha, variant(decode_tokens=body.decode_tokens + 50))  # a cheating node, signed
    doc = json.loads(variant().to_bytes())  # altered after signing: the signature no longer matches
    doc["prefill_tokens"] += 10
    doc["flops"] += 10 * span_flops
    forged = SignedReceipt(
        json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), inflated.signature, alpha.chain_pem
    )
    wrong_institution = sign_receipt(alpha, variant(institution="Beta"))
    borrowed_cert = sign_receipt(beta, variant())  # credits Alpha, signed by Beta
    second_bill = sign_receipt(alpha, variant())  # the same session again, under a new receipt id
    future = sign_receipt(alpha, variant(ended_at=time.time() + 30 * 86400))  # to outweigh decayed history
    bad = {
        "inflated": (ReceiptBody.from_bytes(inflated.body).receipt_id, inflated),
        "forged": (doc["receipt_id"], forged),
        "wrong institution": (ReceiptBody.from_bytes(wrong_institution.body).receipt_id, wrong_institution),
        "borrowed certificate": (ReceiptBody.from_bytes(borrowed_cert.body).receipt_id, borrowed_cert),
        "second bill": (ReceiptBody.from_bytes(second_bill.body).receipt_id, second_bill),
        "future-dated": (ReceiptBody.from_bytes(future.body).receipt_id, future),
    }
    balances = {b.institution: b.balance_flops for b in ledger.balances()}
    outbox = books.outbox("Alpha")
    # In one transaction, so that one poll gets them all: a node's rejections are audited at most once a minute.
    with contextlib.closing(sqlite3.connect(outbox.path)) as db, db:
        db.executemany(
            "INSERT INTO receipts (receipt_id, coordinator, body, signature, cert_pem, created_at)"
            " VALUES (?, 'Coord', ?, ?, ?, ?)",
            [(receipt_id, s.body, s.signature, s.cert_pem, time.time()) for receipt_id, s in bad.values()],
        )
    wait_for("every altered receipt to be settled", lambda: not _pending(outbox), WAIT_S)

    booked = {r.receipt_id for r in ledger.receipts()}
    assert not booked & {rid for rid, _ in bad.values()}
    assert {b.institution: b.balance_flops for b in ledger.balances()} == balances
    rejections = [e for e in ledger.audit_events() if e.action in ("receipt_rejected", "receipts_rejected")]
    audited = " ".join(f"{e.subject} {e.detail}" for e in rejections)  # one event names up to ten
    for what, (receipt_id, _) in bad.items():
        assert receipt_id in audited, f"the {what} receipt left no audit event"
    assert outbox.counts().get("rejected", 0) >= len(bad)
    assert _verify(books.pool_dir).returncode == 0


def test_receipts_survive_crashes_of_the_coordinator_and_the_node(books: BooksPool) -> None:
    """Receipts left in the outboxes while the coordinator is down, and its node crashed and came back
    meanwhile, are booked once everything is up again."""
    coordinator = books.pool.processes.pop()
    coordinator.stop()
    books.start_coordinator(receipt_interval_s=3600)  # collects once at start, then never
    ledger = books.ledger
    count = len(ledger.receipts())
    observed = _observations(ledger)
    books.chat("Before the crash.")
    wait_for("Alpha's receipt in its outbox", lambda: _pending(books.outbox("Alpha")), WAIT_S)
    wait_for("the coordinator to write down what it saw", lambda: _observations(ledger) == observed + 2, WAIT_S)
    # The killed processes stay in pool.processes: pool.stop() then kills the process groups, with
    # the DHT helpers (a forked DHT process, p2pd) that a kill -9 of the process alone leaves running.
    books.pool.processes[-1].kill_hard()
    assert len(ledger.receipts()) == count
    books.pool.nodes["node-a"].kill_hard()
    books.pool.start_nodes({"node-a": "0:2"}, {"node-a": books.bundles["Alpha"]})  # same outbox file
    books.start_coordinator()
    wait_for("both receipts booked", lambda: len(ledger.receipts()) == count + 2, WAIT_S)
    # A node drops a receipt when the coordinator acknowledges it, just after booking.
    wait_for(
        "both outboxes emptied", lambda: _pending(books.outbox("Alpha")) + _pending(books.outbox("Beta")) == 0, WAIT_S
    )
    assert len(ledger.receipts()) == count + 2
    assert _verify(books.pool_dir).returncode == 0


def _fresh_receipt(books: BooksPool, prompt: str) -> Receipt:
    """Alpha's receipt for one new request, once both of its receipts are booked."""
    ledger = books.ledger
    count = len(ledger.receipts())
    books.chat(prompt)
    wait_for("the request's receipts", lambda: len(ledger.receipts()) == count + 2, WAIT_S)
    return ledger.receipts(institution="Alpha", limit=1)[0]


def _observations(ledger: Ledger) -> int:
    with ledger.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(Observation)).scalar_one())


def _pending(outbox: Outbox) -> int:
    return outbox.counts().get("pending", 0)
