"""Attack 8, wrong activations: a member node adds noise, skips its blocks, runs another model, cheats at times.

Pool (the tiny chat model, 4 blocks): Uni A's honest "head-a" 0:2 and "tail-a" 2:4, Uni B's
"head-b" and "tail-b" likewise; the coordinator checks every session (rate 1, so that the bounds
below are in sessions, not in luck). Mallory's cheater (`cheating_node`, a real node whose span
returns tampered activations with consistent sketches, and which claims to be fast to get routes)
serves 0:4: routes use it whole, and spot checks re-compute it on two honest replica routes (one
to check, one to settle). Each kind of cheat is started in turn, under a fresh node id, and must
be quarantined within MAX_BURSTS bursts of concurrent chats, with every answer equal to the
single-process reference; afterwards no route uses it. Honest nodes are never flagged (500+
checked steps with real engines, batched: tests/unit/test_spot_checks.py). The admin lifts a
quarantine with the real CLI, and `coop status --pool` shows the trust records.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from coop import launcher
from coop.launcher import LocalPool
from coop.ledger.store import Ledger
from coop.swarm.node_key import NodeKey
from coop.swarm.trust import DISPUTED, FAILED, QUARANTINED, TrustRecord, trust_from_ledger
from tests.adversarial.cheating_node import CHEATS
from tests.chat_requests import answered_chat
from tests.pools import make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

HONEST = {"head-a": "0:2", "tail-a": "2:4", "head-b": "0:2", "tail-b": "2:4"}
OWNERS = {"head-a": "Uni A", "tail-a": "Uni A", "head-b": "Uni B", "tail-b": "Uni B"}
QUESTIONS = ["What is the capital of France?", "Name a colour.", "What is 2+2?", "Say hello."]
BURST = 6  # concurrent chats: the coordinator spreads them over routes, so the cheater gets some
MAX_BURSTS = 6  # a cheater must be quarantined within this many bursts
HONEST_BURSTS = 3  # 500+ checked steps with real engines, batched, are in tests/unit/test_spot_checks.py
MAX_TOKENS = 12
WAIT_S = 60.0


@dataclass
class CheckedPool:
    pool: LocalPool
    key: str
    ledger: Ledger
    mallory: Path
    pool_dir: Path
    coordinator: Path  # its member bundle

    def trust(self) -> dict[str, TrustRecord]:
        """Per node id: every node of this pool has an id no other member's node has."""
        return {node.node_id: record for node, record in trust_from_ledger(self.ledger).items()}

    def coordinator_log(self) -> list[str]:
        return next(p for p in self.pool.processes if p.name == "coordinator").lines[-40:]

    def flagged(self, actions: tuple[str, ...] = (QUARANTINED, FAILED)) -> set[str]:
        """Nodes with a verdict against them (by default); a dispute (DISPUTED) names both sides and is a
        verdict against nobody: no referee of a third institution was there to settle it."""
        events = [e for action in actions for e in self.ledger.audit_events(action=action)]
        return {NodeKey.parse(event.subject).node_id for event in events}

    def burst(self, reference: Callable[[str, int], list[int]]) -> list[list[str]]:
        """BURST concurrent greedy chats, each checked against the reference; their routes."""

        def chat(question: str) -> list[str]:
            coop = answered_chat(self.pool.url, self.key, question, MAX_TOKENS, timeout_s=300)["coop"]
            assert coop["token_ids"] == reference(question, MAX_TOKENS), question
            return [hop["node_id"] for hop in coop["route"]]

        with ThreadPoolExecutor(BURST) as threads:
            return list(threads.map(chat, [QUESTIONS[i % len(QUESTIONS)] for i in range(BURST)]))


@pytest.fixture(scope="module")
def checked(tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CheckedPool]:
    disk = make_pool(
        tmp_path_factory.mktemp("checked") / "pool",
        "Checked pool",
        ("Uni A", "Uni B", "Mallory", "Client"),
        coordinators=("Coord",),
        api_keys=("Client",),
    )
    bundles, coordinator = disk.bundles, disk.bundles["Coord"]
    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht(member=coordinator)
        pool.start_nodes(HONEST, {name: bundles[owner] for name, owner in OWNERS.items()})
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_RATE", "1")
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_NEW_NODE_RATE", "1")
            disk.start_coordinator(pool, "Coord")
        yield CheckedPool(pool, disk.keys["Client"], disk.ledger(), bundles["Mallory"], disk.directory, coordinator)
    finally:
        pool.stop()


def test_honest_replicas_pass_their_checks(
    checked: CheckedPool, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    for _ in range(HONEST_BURSTS):
        checked.burst(tiny_reference)
    # at least the prefill of every session on both hops of its route (multi-token steps make fewer steps)
    expected = HONEST_BURSTS * BURST * 2

    def passed() -> int | None:
        total = sum(record.passed for record in checked.trust().values())
        return total if total >= expected else None

    total = wait_for(f"{expected} checked node-steps in the ledger", passed, WAIT_S)
    print(f"honest: {total} node-steps checked, none flagged")
    assert checked.flagged((QUARANTINED, FAILED, DISPUTED)) == set()
    assert set(checked.trust()) == set(HONEST)


@pytest.mark.parametrize("kind", CHEATS)
def test_cheater_is_quarantined_and_sessions_keep_their_tokens(
    checked: CheckedPool, tiny_reference: Callable[[str, int], list[int]], kind: str
) -> None:
    cheater = f"cheat-{kind.replace('_', '-')}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launcher, "COOP", [sys.executable, "-m", "tests.adversarial.cheating_node"])
        patch.setenv("COOP_CHEAT", kind)
        checked.pool.start_nodes({cheater: "0:4"}, {cheater: checked.mallory})
    try:
        bursts = 0
        while cheater not in checked.trust() or not checked.trust()[cheater].quarantined:
            assert bursts < MAX_BURSTS, f"{cheater} not quarantined after {bursts} bursts of {BURST} sessions:\n" + (
                "\n".join(checked.coordinator_log())
            )
            print(checked.burst(tiny_reference))
            bursts += 1
        record = checked.trust()[cheater]
        print(f"{kind}: quarantined after {bursts} bursts of {BURST} sessions: {record.quarantined}")
        assert "distance" in record.quarantined
        routes = checked.burst(tiny_reference)
        assert all(cheater not in route for route in routes), routes
        assert checked.flagged() <= {f"cheat-{k.replace('_', '-')}" for k in CHEATS}
    finally:
        checked.pool.nodes.pop(cheater).stop()


def test_the_admin_lifts_a_quarantine_and_coop_status_shows_trust(
    checked: CheckedPool, tiny_chat_model_dir: str
) -> None:
    cheater = "cheat-noise"
    assert checked.trust()[cheater].quarantined
    lift = [*launcher.COOP, "node", "quarantine", "lift", cheater, "--pool", str(checked.pool_dir), "--reason", "fixed"]
    done = subprocess.run(lift, capture_output=True, text=True, timeout=WAIT_S, env=_cli_env())
    assert done.returncode == 0, done.stdout + done.stderr
    record = checked.trust()[cheater]
    assert record.quarantined == "" and record.failed >= 1  # every session that caught it is on the record
    again = subprocess.run(lift, capture_output=True, text=True, timeout=WAIT_S, env=_cli_env())
    assert again.returncode != 0 and "is not quarantined" in again.stdout + again.stderr

    status = [
        *launcher.COOP,
        "status",
        "--model",
        tiny_chat_model_dir,
        "--initial-peers",
        checked.pool.peer,
        "--member",
        str(checked.coordinator),
        "--pool",
        str(checked.pool_dir),
    ]
    shown = subprocess.run(status, capture_output=True, text=True, timeout=WAIT_S, env=_cli_env())
    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = {line.split("│")[1].strip(): line for line in shown.stdout.splitlines() if line.count("│") > 2}
    for name in HONEST:
        assert f"{checked.trust()[name].passed} / 0" in rows[name], shown.stdout


def _cli_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "250"}
