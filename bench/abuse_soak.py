"""Honest traffic under abuse: time per token of honest streams, without and with abusers, in one run.

A member pool of real processes on 127.0.0.1: a DHT peer, Alpha's node (blocks 0:15 of the demo
model), Beta's (15:30), Mallory's (0:15) and the pool's coordinator with its SQLite ledger. Honest
clients run --streams concurrent streamed chat requests for --duration seconds, first with no abuse
(the baseline), then again while the abuses run. Prints, for both phases, the honest streams'
p50/p99 time per token (the gaps between streamed tokens), requests and errors, their ratio, what
each abuse did, and the RSS of every process (with its children: DHT helpers, p2pd) at start, after
the baseline and at the end.

Abuses (one context manager each, in ABUSES; add one there to add an abuse):
  receipt-flood  Mallory's node is restarted as `tests.adversarial.flooding_node`: every receipt poll
                 is answered with thousands of junk receipts, every other one only after 30 s.
  junk-http      clients without a valid key send the coordinator large bodies, malformed JSON,
                 wrong keys, schema and admin sign-in requests, as fast as it answers.
  heavy-requests Mallory's valid API key sends, as fast as it is answered and as many at once as the
                 key may: 100,000 stop strings, a 3 MB prompt, max_tokens past the context.
  kv-pin         Mallory's API key opens SDK relay sessions of the longest length the pool allows, so
                 that every node reserves their KV caches, and leaves them idle (re-opening each one
                 the coordinator closes).

    .venv/bin/python bench/abuse_soak.py [--duration 180] [--streams 8] [--tokens 32]
                                         [--abuses receipt-flood,junk-http]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.adversarial.flooding_node
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from coop import launcher  # noqa: E402
from coop.config import CoordinatorSettings  # noqa: E402
from coop.launcher import LocalPool  # noqa: E402
from coop.model.manifest import Manifest  # noqa: E402
from coop.model.prepare import prepare  # noqa: E402
from coop.pool.registry import add_member, create_api_key, create_pool  # noqa: E402

MODEL_DIR = Path(os.environ.get("COOP_BENCH_MODEL_DIR", REPO / ".cache" / "smollm2-demo"))
PROMPT = "Write a long story about a brave knight and a dragon."
SPANS = {"alpha-1": "0:15", "beta-1": "15:30", "mallory-1": "0:15"}
OWNERS = {"alpha-1": "Alpha", "beta-1": "Beta", "mallory-1": "Mallory"}
JUNK_HTTP_THREADS = 2
JUNK_BODY_BYTES = 8 << 20


@dataclass
class Soak:
    pool: LocalPool
    pool_dir: Path
    bundles: dict[str, Path]
    key: str  # Gamma's: the honest clients'
    abuser_key: str  # Mallory's
    admin_token: str
    model_hash: str
    max_length: int  # the longest session the pool allows

    def admin_get(self, path: str) -> Any:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        return httpx.get(f"{self.pool.url}/admin/api/{path}", headers=headers, timeout=60).json()


@dataclass
class Phase:
    name: str
    gaps_s: list[float] = field(default_factory=list)  # between consecutive streamed tokens
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    tokens: int = 0


# -- abuses: each sets itself up, runs while the `with` block does, and fills in its report ----------------


@contextmanager
def receipt_flood(soak: Soak, report: dict[str, Any]) -> Iterator[None]:
    """Mallory's honest node is replaced by one that floods the coordinator with junk receipts."""
    honest = soak.pool.nodes.pop("mallory-1")
    honest.stop()
    soak.pool.processes.remove(honest)
    previous, launcher.COOP = launcher.COOP, [sys.executable, "-m", "tests.adversarial.flooding_node"]
    try:
        soak.pool.start_nodes({"mallory-1": SPANS["mallory-1"]}, {"mallory-1": soak.bundles["Mallory"]})
    finally:
        launcher.COOP = previous
    yield
    collection = soak.admin_get("receipt-collection")
    report["mallory-1"] = next((n for n in collection["nodes"] if n["node_id"] == "mallory-1"), {})
    report["audit events written"] = collection["audit_events_written"]
    report["audit events suppressed"] = collection["audit_events_suppressed"]


@contextmanager
def junk_http(soak: Soak, report: dict[str, Any]) -> Iterator[None]:
    """Keyless and wrongly keyed requests to the coordinator, from JUNK_HTTP_THREADS clients."""
    url = soak.pool.url
    junk: list[Callable[[httpx.Client], httpx.Response]] = [
        lambda c: c.post(f"{url}/v1/chat/completions", content=b"x" * JUNK_BODY_BYTES),
        lambda c: c.post(f"{url}/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "json"}),
        lambda c: c.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": "Bearer sk-not-a-key"},
        ),
        lambda c: c.get(f"{url}/openapi.json"),
        lambda c: c.post(f"{url}/admin/login", data={"token": "not-the-admin-token", "csrf_token": "x"}),
    ]
    with _hammering(lambda http, i: junk[i % len(junk)](http), JUNK_HTTP_THREADS, report):
        yield


@contextmanager
def heavy_requests(soak: Soak, report: dict[str, Any]) -> Iterator[None]:
    """Requests a valid key may send, each as expensive as an abuser can make it."""
    url, headers = f"{soak.pool.url}/v1/chat/completions", {"Authorization": f"Bearer {soak.abuser_key}"}
    question = [{"role": "user", "content": "hi"}]
    bodies: list[dict[str, Any]] = [
        {"messages": question, "stop": [f"stop-{i}" for i in range(100_000)], "max_tokens": 8},
        {"messages": [{"role": "user", "content": "x " * (3 << 19)}], "max_tokens": 8},
        {"messages": question, "max_tokens": 10**7},
    ]
    with _hammering(lambda http, i: http.post(url, json=bodies[i % len(bodies)], headers=headers), 8, report):
        yield


@contextmanager
def kv_pin(soak: Soak, report: dict[str, Any]) -> Iterator[None]:
    """Idle relay sessions as long as allowed: each makes every node of its route reserve a KV cache."""
    url, headers = f"{soak.pool.url}/v1/coop/sessions", {"Authorization": f"Bearer {soak.abuser_key}"}
    body = {"max_length": soak.max_length, "model_hash": soak.model_hash}
    with _hammering(lambda http, _: http.post(url, json=body, headers=headers), 1, report, pause_s=1.0):
        yield


@contextmanager
def _hammering(
    call: Callable[[httpx.Client, int], httpx.Response], threads: int, report: dict[str, Any], pause_s: float = 0.0
) -> Iterator[None]:
    """`threads` clients making `call` until the block ends; the report counts the answers by status."""
    stop = threading.Event()
    statuses: Counter[str] = Counter()
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            for index in itertools.count():
                if stop.is_set():
                    return
                try:
                    status = str(call(http, index).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    statuses[status] += 1
                stop.wait(pause_s)

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
        report["responses"] = dict(statuses)


ABUSES: dict[str, Callable[[Soak, dict[str, Any]], Any]] = {
    "receipt-flood": receipt_flood,
    "junk-http": junk_http,
    "heavy-requests": heavy_requests,
    "kv-pin": kv_pin,
}


# -- honest traffic -------------------------------------------------------------------------------------


def honest_stream(soak: Soak, tokens: int, until: float, phase: Phase, lock: threading.Lock) -> None:
    """Streamed requests one after another until `until` (monotonic seconds)."""
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {soak.key}"}
    while time.monotonic() < until:
        arrivals: list[float] = []
        count = 0
        try:
            with httpx.stream(
                "POST", f"{soak.pool.url}/v1/chat/completions", json=body, headers=headers, timeout=600
            ) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        arrivals.append(time.perf_counter())
                    if chunk.get("usage"):
                        count = chunk["usage"]["completion_tokens"]
        except httpx.HTTPError as exc:
            with lock:
                phase.errors[type(exc).__name__] += 1
            continue
        with lock:
            phase.requests += 1
            phase.tokens += count
            phase.gaps_s += [b - a for a, b in itertools.pairwise(arrivals)]


def run_phase(soak: Soak, name: str, streams: int, tokens: int, duration_s: float) -> Phase:
    phase, lock = Phase(name), threading.Lock()
    until = time.monotonic() + duration_s
    with ThreadPoolExecutor(max_workers=streams) as executor:
        for done in [executor.submit(honest_stream, soak, tokens, until, phase, lock) for _ in range(streams)]:
            done.result()
    return phase


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


# -- processes ------------------------------------------------------------------------------------------


def rss_mib(soak: Soak) -> dict[str, float]:
    """Each pool process's resident memory, its children included (MiB)."""
    out = {}
    for process in soak.pool.processes:
        try:
            root = psutil.Process(process.popen.pid)
            tree = [root, *root.children(recursive=True)]
            out[process.name] = sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20
        except psutil.Error:
            out[process.name] = float("nan")
    return out


def start_pool(directory: Path) -> Soak:
    pool_dir = directory / "pool"
    info = create_pool(pool_dir, "Soak pool")
    assert info.admin_token is not None
    bundles = {name: add_member(pool_dir, name) for name in ("Alpha", "Beta", "Mallory", "Gamma")}
    bundles["Coord"] = add_member(pool_dir, "Coord", role="coordinator")
    key, abuser_key = create_api_key(pool_dir, "Gamma"), create_api_key(pool_dir, "Mallory")
    pool = LocalPool(str(MODEL_DIR))
    manifest = Manifest.load(MODEL_DIR)
    max_length = min(info.limits.max_tokens_per_request, CoordinatorSettings.model_fields["max_context"].default)
    soak = Soak(pool, pool_dir, bundles, key, abuser_key, info.admin_token, manifest.content_hash, max_length)
    pool.start_dht(member=bundles["Coord"])
    pool.start_nodes(SPANS, {name: bundles[owner] for name, owner in OWNERS.items()})
    pool.start_coordinator(member=bundles["Coord"], api_keys=pool_dir / "api_keys.json",
                           extra_args=["--pool-dir", str(pool_dir)])  # fmt: skip
    return soak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds per phase")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per honest request")
    parser.add_argument("--abuses", default=",".join(ABUSES), help=f"comma-separated, of: {', '.join(ABUSES)}")
    args = parser.parse_args()
    chosen = [name for name in args.abuses.split(",") if name]
    unknown = set(chosen) - set(ABUSES)
    if unknown:
        parser.error(f"unknown abuses {sorted(unknown)}; known: {', '.join(ABUSES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prepare("smollm2-demo", MODEL_DIR)

    with tempfile.TemporaryDirectory(prefix="coop-soak-") as tmp:
        soak = start_pool(Path(tmp))
        try:
            run_phase(soak, "warm-up", 1, 8, 1.0)  # at least one request: connections, caches
            memory = {"start": rss_mib(soak)}
            baseline = run_phase(soak, "no abuse", args.streams, args.tokens, args.duration)
            memory["after no abuse"] = rss_mib(soak)
            reports: dict[str, dict[str, Any]] = {name: {} for name in chosen}
            with ExitStack() as stack:
                for name in chosen:
                    stack.enter_context(ABUSES[name](soak, reports[name]))
                abused = run_phase(soak, "abuse: " + ", ".join(chosen), args.streams, args.tokens, args.duration)
            memory["end"] = rss_mib(soak)
        finally:
            soak.pool.stop()

    print(f"\n{args.streams} honest streams x {args.duration:.0f} s per phase, {args.tokens} tokens per request, "
          f"demo model on {len(SPANS)} nodes, {os.cpu_count()} CPU cores")  # fmt: skip
    print(f"{'phase':40s} {'requests':>8s} {'errors':>6s} {'tokens':>7s} {'p50 ms/token':>13s} {'p99 ms/token':>13s}")
    for phase in (baseline, abused):
        p50, p99 = percentile(phase.gaps_s, 50) * 1000, percentile(phase.gaps_s, 99) * 1000
        errors = sum(phase.errors.values())
        print(f"{phase.name:40s} {phase.requests:8d} {errors:6d} {phase.tokens:7d} {p50:13.1f} {p99:13.1f}")
    for q in (50, 99):
        ratio = percentile(abused.gaps_s, q) / percentile(baseline.gaps_s, q)
        print(f"ratio p{q} abuse / no abuse: {ratio:.2f}x")
    for phase in (baseline, abused):
        if phase.errors:
            print(f"errors ({phase.name}): {dict(phase.errors)}")
    for name, report in reports.items():
        print(f"{name}: {json.dumps(report)}")
    print(f"\n{'RSS (MiB, with children)':28s}" + "".join(f"{when:>16s}" for when in memory))
    for process in memory["start"]:
        print(f"{process:28s}" + "".join(f"{memory[when].get(process, float('nan')):16.0f}" for when in memory))


if __name__ == "__main__":
    main()
