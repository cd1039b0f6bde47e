"""Crash-safe metering with real processes: `kill -9` of a node or of the coordinator in the middle of a
long session costs the providers at most one receipt batch, and `coop ledger verify` passes.

Nodes close a receipt batch every BATCH_TOKENS tokens and the coordinator writes its observation as
often; the tiny chat model keeps the sessions fast (token equality is not the point here).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import Session, col

from coop.launcher import COOP, LocalPool
from coop.ledger.database import sqlite_url
from coop.ledger.models import Observation, Receipt
from coop.ledger.store import Ledger
from coop.model.manifest import Manifest
from tests.chat_requests import stream_greedy_chat
from tests.pools import make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow
BATCH_TOKENS = 32
WAIT_S = 120.0
SPANS = {"node-a": "0:4", "node-b": "0:4"}  # either can carry a whole session: a failover target
MEMBERS = {"node-a": "Alpha", "node-b": "Beta"}


@dataclass
class CrashPool:
    pool: LocalPool
    pool_dir: Path
    bundles: dict[str, Path]
    key: str
    ledger: Ledger
    model: str

    def start_coordinator(self) -> None:
        self.pool.start_coordinator(
            member=self.bundles["Coord"],
            api_keys=self.pool_dir / "api_keys.json",
            extra_args=["--pool-dir", str(self.pool_dir), "--receipt-interval-s", "0.3"],
        )

    def sessions(self) -> dict[tuple[str, str], Observation]:
        with Session(self.ledger.engine) as session:
            return {(o.session_id, o.node_id): o for o in session.execute(select(Observation)).scalars()}

    def booked(self, session_id: str, node_id: str) -> list[Receipt]:
        query = select(Receipt).where(col(Receipt.session_id) == session_id, col(Receipt.node_id) == node_id)
        with Session(self.ledger.engine) as session:
            return sorted(session.execute(query).scalars(), key=lambda r: r.batch)


@dataclass
class Stream:
    """A long streamed chat in a thread, counting its chunks (each at least one token)."""

    url: str
    key: str
    model: str
    max_tokens: int
    chunks: int = 0
    finished: bool = False
    error: str = ""
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for chunk in stream_greedy_chat(self.url, "Tell me a long story.", self.max_tokens, self.key, self.model):
                self.chunks += 1
                self.finished |= bool(chunk.get("choices") and chunk["choices"][0].get("finish_reason"))
        except Exception as exc:  # the coordinator was killed under it
            self.error = repr(exc)


@pytest.fixture(scope="module")
def crash_pool(tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashPool]:
    mp = pytest.MonkeyPatch()
    mp.setenv("COOP_NODE_RECEIPT_BATCH_TOKENS", str(BATCH_TOKENS))
    mp.setenv("COOP_COORDINATOR_OBSERVATION_CHECKPOINT_TOKENS", str(BATCH_TOKENS))
    pool_dir = tmp_path_factory.mktemp("crash") / "pool"
    members = ("Alpha", "Beta", "Gamma")
    disk = make_pool(pool_dir, "Crash metering pool", members, coordinators=("Coord",), api_keys=("Gamma",))
    bundles, key = disk.bundles, disk.keys["Gamma"]
    pool = LocalPool(tiny_chat_model_dir)
    ledger = None
    try:
        pool.start_dht()
        pool.start_nodes(SPANS, {node: bundles[member] for node, member in MEMBERS.items()})
        ledger = Ledger.open(sqlite_url(pool_dir / "ledger.db"))
        crash = CrashPool(pool, pool_dir, bundles, key, ledger, Manifest.load(tiny_chat_model_dir).name)
        crash.start_coordinator()
        yield crash
    finally:
        pool.stop()
        if ledger is not None:
            ledger.close()
        mp.undo()


def _verify(pool_dir: Path) -> None:
    done = subprocess.run([*COOP, "ledger", "verify", "--pool", str(pool_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _new_session(crash: CrashPool, before: set[tuple[str, str]], stream: Stream) -> tuple[str, str]:
    """The (session, node) the coordinator put on record since `before`."""

    def fresh() -> set[tuple[str, str]]:
        return set(crash.sessions()) - before

    return next(iter(wait_for("the session on record", fresh, WAIT_S)))


def _assert_booked_all_but_one_batch(crash: CrashPool, session_id: str, node_id: str) -> None:
    def settled() -> bool:
        seen = crash.sessions()[(session_id, node_id)]
        paid = sum(r.prefill_tokens + r.decode_tokens for r in crash.booked(session_id, node_id))
        return seen.prefill_tokens + seen.decode_tokens - paid < BATCH_TOKENS

    wait_for(f"the receipts of {node_id} booked", settled, WAIT_S)
    receipts = crash.booked(session_id, node_id)
    seen = crash.sessions()[(session_id, node_id)]
    observed = seen.prefill_tokens + seen.decode_tokens
    claimed = sum(r.prefill_tokens + r.decode_tokens for r in receipts)
    print(f"{node_id}: observed {observed} tokens, {len(receipts)} batches booked for {claimed}")
    assert [r.batch for r in receipts] == list(range(len(receipts))), "a gap in the batches"
    assert observed - BATCH_TOKENS < claimed <= observed


def test_kill_9_of_a_node_loses_at_most_one_batch(crash_pool: CrashPool) -> None:
    before = set(crash_pool.sessions())
    stream = Stream(crash_pool.pool.url, crash_pool.key, crash_pool.model, max_tokens=300)
    session_id, victim = _new_session(crash_pool, before, stream)
    wait_for("200 tokens", lambda: stream.chunks >= 200 or not stream.thread.is_alive(), WAIT_S, 0.01)
    assert stream.chunks >= 200, "the session ended before 200 tokens"
    crash_pool.pool.nodes[victim].kill_hard()
    stream.thread.join(WAIT_S)
    assert stream.finished, "the request did not survive the failover"
    crash_pool.pool.start_nodes({victim: SPANS[victim]}, {victim: crash_pool.bundles[MEMBERS[victim]]})
    _assert_booked_all_but_one_batch(crash_pool, session_id, victim)
    _verify(crash_pool.pool_dir)


def test_kill_9_of_the_coordinator_leaves_its_sessions_bookable(crash_pool: CrashPool) -> None:
    before = set(crash_pool.sessions())
    stream = Stream(crash_pool.pool.url, crash_pool.key, crash_pool.model, max_tokens=300)
    session_id, node_id = _new_session(crash_pool, before, stream)
    wait_for("100 tokens", lambda: stream.chunks >= 100, WAIT_S, 0.01)
    coordinator = next(p for p in reversed(crash_pool.pool.processes) if p.name == "coordinator")
    coordinator.kill_hard()
    stream.thread.join(WAIT_S)
    assert not stream.finished
    crash_pool.start_coordinator()
    _assert_booked_all_but_one_batch(crash_pool, session_id, node_id)
    _verify(crash_pool.pool_dir)
