"""A member's node buries the coordinator in junk receipts; records point the coordinator at other hosts.

Pool "flood": Alpha's node serves blocks 0:2 and Beta's 2:4 of the tiny chat model; Mallory's node
serves 0:2 too, computes honestly, and answers receipt polls with thousands of junk receipts, every
other answer only after 30 s (`flooding_node`). Gamma pays. Eve was a member, and is revoked.

- Whom the coordinator dials: Eve's validly signed announcement is in the DHT (its peers do not know
  revocations) and points at a port of ours; it must never be dialled, while a member's record that
  points at another port of ours is.
- The flood: Gamma's requests keep getting the tokens a single process computes and the honest
  nodes' receipts are booked; the junk costs a bounded number of audit events (at most one per
  node per interval, and one more when the coordinator stops), the admin view counts it, and the books verify.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from coop import launcher
from coop.launcher import COOP, CoopProcess, LocalPool
from coop.model.manifest import Manifest
from coop.pool.bundle import MemberBundle
from coop.pool.registry import revoke_member
from coop.swarm.announcement import NodeAnnouncement, stamp_announcement
from coop.swarm.directory import SwarmDirectory
from tests.adversarial.flooding_node import JUNK
from tests.pools import ServedPool, make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow
WAIT_S = 90.0
QUESTIONS = ["Count to three.", "Name a colour.", "Say hello to the pool.", "What is a ledger?"]
MAX_TOKENS = 6
HONEST = ("node-a", "node-b")
AUDIT_INTERVAL_S = 3600.0  # longer than the module runs: its audit trail of the flood is one interval's


@dataclass
class FloodPool(ServedPool):
    admin_token: str
    coordinator: CoopProcess

    def collection(self) -> dict[str, Any]:
        """The coordinator's receipt collection counters, from the admin view's JSON API."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        response = httpx.get(f"{self.pool.url}/admin/api/receipt-collection", headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def tally(self, node_id: str) -> dict[str, int]:
        return next((n for n in self.collection()["nodes"] if n["node_id"] == node_id), {})


@pytest.fixture(scope="module")
def flood(tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FloodPool]:
    disk = make_pool(
        tmp_path_factory.mktemp("flood") / "pool",
        "Flood pool",
        ("Alpha", "Beta", "Gamma", "Mallory", "Eve"),
        coordinators=("Coord",),
        api_keys=("Gamma",),
    )
    revoke_member(disk.directory, "Eve")
    bundles = disk.bundles
    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht(member=bundles["Coord"])
        pool.start_nodes({"node-a": "0:2", "node-b": "2:4"}, {"node-a": bundles["Alpha"], "node-b": bundles["Beta"]})
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(launcher, "COOP", [sys.executable, "-m", "tests.adversarial.flooding_node"])
            pool.start_nodes({"node-m": "0:2"}, {"node-m": bundles["Mallory"]})
        with pytest.MonkeyPatch.context() as patch:  # one interval for the whole module: the bound is exact
            patch.setenv("COOP_COORDINATOR_RECEIPT_AUDIT_INTERVAL_S", str(AUDIT_INTERVAL_S))
            coordinator = disk.start_coordinator(pool, "Coord", ["--receipt-interval-s", "0.3"])
        manifest = Manifest.load(tiny_chat_model_dir)
        yield FloodPool(pool, disk.directory, bundles, disk.keys["Gamma"], manifest, disk.admin_token, coordinator)
    finally:
        pool.stop()


class Listener:
    """A local port that counts the connections made to it (and hangs up on each)."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.accepted = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._socket.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            connection.close()

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self._socket.close()


def _record(flood: FloodPool, institution: str, node_id: str, endpoint: str) -> NodeAnnouncement:
    """A node record of `institution`, signed with its own bundle, pointing at `endpoint`."""
    credentials = MemberBundle.load(flood.bundles[institution]).credentials(node_id)
    fields = {
        "node_id": node_id,
        "pool_id": credentials.pool_id,
        "model_hash": flood.manifest.content_hash,
        "start": 3,
        "end": 4,
        "endpoint": endpoint,
        "institution": institution,
        "throughput_tps": 1.0,
        "free_cache_bytes": 1 << 20,
    }
    return stamp_announcement(fields, now=time.time(), ttl_s=60, bundle=credentials)


def test_a_revoked_members_signed_record_is_never_dialled(flood: FloodPool) -> None:
    member_port, revoked_port = Listener(), Listener()
    records = {
        "Mallory": _record(flood, "Mallory", "decoy", member_port.endpoint),
        "Eve": _record(flood, "Eve", "revoked-decoy", revoked_port.endpoint),
    }
    try:
        with SwarmDirectory.start([flood.pool.peer]) as directory:
            try:
                for record in records.values():
                    assert directory.announce(record)
                listed = {n.node_id for n in directory.list_nodes(records["Eve"].pool_id, flood.manifest.content_hash)}
                assert {"decoy", "revoked-decoy"} <= listed  # both are in the DHT, as the coordinator reads it

                # The coordinator polls the member's record for receipts every round (the port is no node: every
                # poll fails), and pings it: by the third connection, it has had every chance to dial Eve's.
                wait_for("the member's record to be dialled thrice", lambda: member_port.accepted >= 3, WAIT_S)
                assert flood.tally("decoy")["errors"] >= 1
                assert revoked_port.accepted == 0
                assert flood.tally("revoked-decoy") == {}
            finally:
                for institution, record in records.items():
                    signer = MemberBundle.load(flood.bundles[institution]).credentials(record.node_id)
                    directory.withdraw(record, signer)
    finally:
        member_port.close()
        revoked_port.close()


def _names(detail: str, node_id: str) -> bool:
    """Whether a rejection event is about `node_id`: its detail names its nodes before the first colon
    ("node X: ..." for one receipt, "institution I, nodes X, Y: ..." for a digest)."""
    return node_id in re.split(r"[ ,]+", detail.partition(":")[0])


def test_a_flood_of_junk_receipts_costs_a_bounded_audit_trail_and_honest_receipts_are_booked(
    flood: FloodPool, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    served: Counter[str] = Counter()  # sessions per node, from the routes the answers report
    for question in QUESTIONS:
        answer = flood.greedy_chat(question, MAX_TOKENS)
        assert answer["coop"]["token_ids"] == tiny_reference(question, MAX_TOKENS), question
        served.update(hop["node_id"] for hop in answer["coop"]["route"])
    assert served["node-b"] == len(QUESTIONS)

    ledger = flood.ledger
    try:

        def booked(node_id: str) -> int:
            return sum(1 for r in ledger.receipts() if r.node_id == node_id)

        for node_id in HONEST:
            wait_for(f"{node_id}'s receipts to be booked", lambda n=node_id: booked(n) >= served[n], WAIT_S)
            assert booked(node_id) == served[node_id]

        def flooded() -> dict[str, int] | None:
            tally = flood.tally("node-m")
            return tally if tally["rejected"] + tally["dropped"] >= 2 * JUNK and tally["timeouts"] >= 1 else None

        mallory = wait_for("two junk answers and a slow one from Mallory's node", flooded, WAIT_S)
        assert mallory["backoff_rounds"] >= 2 and mallory["skipped"] >= 2
        for node_id in HONEST:
            assert (flood.tally(node_id)["rejected"], flood.tally(node_id)["dropped"]) == (0, 0)
        assert flood.collection()["audit_events_suppressed"] >= JUNK // 2  # the first junk answer: one event

        flood.coordinator.stop()  # it writes the rejections it gathered since its last event
        # one interval: the first rejections' event (due at once), and the rest gathered until the stop
        audited = [e for e in ledger.audit_events() if _names(e.detail, "node-m")]
        assert 1 <= len(audited) <= 2, [e.detail for e in audited]
        assert any(e.action == "receipts_rejected" and e.subject == "node-m" for e in audited)
        assert not [e for e in ledger.audit_events() if _names(e.detail, "node-a") or _names(e.detail, "node-b")]
        assert {r.node_id for r in ledger.receipts()} <= {"node-a", "node-b", "node-m"}
        for node_id in HONEST:
            assert booked(node_id) == served[node_id]
    finally:
        ledger.close()

    verified = subprocess.run(
        [*COOP, "ledger", "verify", "--pool", str(flood.pool_dir)], capture_output=True, text=True, timeout=180
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
