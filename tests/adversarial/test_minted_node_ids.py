"""Attack 1 of "the institution is the unit of trust": a member's many node ids check each other.

Mallory runs eight node ids, its allowance, in one process (`minted_nodes`: real nodes of
`cheating_node`'s kind skip, each returning its input as if it had no blocks, with sketches consistent
with that lie) over the same blocks as an honest node of another institution. Were replicas chosen by
node id, Mallory's nodes would shadow and referee one another and the honest node, pass their own
checks and get the honest node quarantined. Replicas and referees come from institutions independent
of the checked route and of each other instead:

- with a third, honest institution in the pool, no honest node is ever quarantined or found at fault,
  every one of Mallory's nodes that a check meets is quarantined, and every answer equals the
  single-process reference: a conviction takes Mallory out of the session's routes, so its other
  node ids cannot use up the request's failovers;
- with only Mallory and its victim, nobody can settle a disagreement: it is a dispute, audited
  against both, a verdict against neither (no quarantine, no failed check).

Every session is checked (rate 1), so the outcomes are in sessions, not in luck.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from coop import launcher
from coop.launcher import LocalPool, start
from coop.ledger.store import Ledger
from coop.swarm.node_key import NodeKey
from coop.swarm.trust import DISPUTED, FAILED, QUARANTINED, trust_from_ledger
from tests.chat_requests import answered_chat
from tests.pools import make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

MALLORY_NODES = 8  # node ids Mallory runs: a member's allowance, by default
QUESTIONS = ["What is the capital of France?", "Name a colour.", "What is 2+2?", "Say hello."]
BURST = 6
MAX_BURSTS = 8
MAX_TOKENS = 8
WAIT_S = 60.0


@dataclass
class AttackedPool:
    pool: LocalPool
    key: str
    ledger: Ledger
    honest: set[NodeKey]
    mallory: set[NodeKey]

    def events(self, *actions: str) -> list[tuple[str, NodeKey]]:
        found = [e for action in actions for e in self.ledger.audit_events(action=action)]
        return [(e.action, NodeKey.parse(e.subject)) for e in found]

    def quarantined(self) -> set[NodeKey]:
        return {node for node, record in trust_from_ledger(self.ledger).items() if record.quarantined}

    def burst(self, reference: Callable[[str, int], list[int]] | None) -> list[list[str]]:
        """BURST concurrent greedy chats (checked against `reference` if given); their routes."""

        def chat(question: str) -> list[str]:
            coop = answered_chat(self.pool.url, self.key, question, MAX_TOKENS, timeout_s=300)["coop"]
            if reference is not None:
                assert coop["token_ids"] == reference(question, MAX_TOKENS), question
            return [hop["node_id"] for hop in coop["route"]]

        with ThreadPoolExecutor(BURST) as threads:
            return list(threads.map(chat, [QUESTIONS[i % len(QUESTIONS)] for i in range(BURST)]))


def _attacked_pool(model_dir: str, directory: Path, honest: dict[str, str]) -> Iterator[AttackedPool]:
    """`honest`: node id -> institution, each serving the whole model beside Mallory's cheaters."""
    members = (*sorted(set(honest.values())), "Mallory", "Client")
    disk = make_pool(directory, "Minted ids", members, coordinators=("Coord",), api_keys=("Client",))
    pool = LocalPool(model_dir)
    try:
        pool.start_dht(member=disk.bundles["Coord"])
        mallory = _start_mallory(pool, disk.bundles["Mallory"])
        pool.start_nodes(dict.fromkeys(honest, "0:4"), {name: disk.bundles[owner] for name, owner in honest.items()})
        cheaters = [mallory.wait_ready("COOP_NODE_READY")["node_id"] for _ in range(MALLORY_NODES)]
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_RATE", "1")
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_NEW_NODE_RATE", "1")
            disk.start_coordinator(pool, "Coord")
        yield AttackedPool(
            pool,
            disk.keys["Client"],
            disk.ledger(),
            {NodeKey(owner, name) for name, owner in honest.items()},
            {NodeKey("Mallory", name) for name in cheaters},
        )
    finally:
        pool.stop()


def _start_mallory(pool: LocalPool, bundle: Path) -> launcher.CoopProcess:
    """Mallory's MALLORY_NODES node ids in one process; started, not yet waited for (one ready line per node)."""
    args = ["node", "start", "--model", pool.model_dir, "--blocks", "0:4", "--initial-peers", pool.peer]
    program = [sys.executable, "-m", "tests.adversarial.minted_nodes"]
    env = {"COOP_CHEAT": "skip", "COOP_MINTED_NODES": str(MALLORY_NODES)}
    args += ["--member", str(bundle), "--node-id", "mallory", "--device", "cpu"]
    mallory = start("mallory", args, None, program=program, env=env)
    pool.processes.append(mallory)
    return mallory


@pytest.fixture
def three_institutions(tiny_chat_model_dir: str, tmp_path: Path) -> Iterator[AttackedPool]:
    yield from _attacked_pool(tiny_chat_model_dir, tmp_path / "pool", {"victim": "Uni V", "third": "Uni T"})


@pytest.fixture
def two_institutions(tiny_chat_model_dir: str, tmp_path: Path) -> Iterator[AttackedPool]:
    yield from _attacked_pool(tiny_chat_model_dir, tmp_path / "pool", {"victim": "Uni V"})


def test_with_an_independent_institution_the_cheaters_are_caught_and_the_honest_never_blamed(
    three_institutions: AttackedPool, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    pool = three_institutions
    routes: list[list[str]] = []
    for _ in range(MAX_BURSTS):
        routes += pool.burst(tiny_reference)
        met = {NodeKey("Mallory", node) for route in routes for node in route} & pool.mallory
        if met and met <= pool.quarantined():
            break
    caught = wait_for("a quarantined cheater", lambda: pool.quarantined() & pool.mallory, WAIT_S)
    print(f"routes: {routes}; quarantined: {sorted(map(str, caught))}")
    blamed = {node for _, node in pool.events(QUARANTINED, FAILED)}
    assert not blamed & pool.honest, pool.events(QUARANTINED, FAILED, DISPUTED)
    assert pool.quarantined() <= pool.mallory
    routes = pool.burst(tiny_reference)
    assert all(NodeKey("Mallory", node) not in caught for route in routes for node in route), routes


def test_with_only_attacker_and_victim_it_is_a_dispute_and_no_one_is_quarantined(
    two_institutions: AttackedPool,
) -> None:
    pool = two_institutions

    def disputed() -> list[tuple[str, NodeKey]] | None:
        return pool.events(DISPUTED) or None

    for _ in range(MAX_BURSTS):
        pool.burst(None)  # a dispute settles nothing: Mallory's answers may be garbage
        if disputed():
            break
    events = wait_for("a dispute in the audit trail", disputed, WAIT_S)
    print(f"disputes: {events}")
    assert {node for _, node in events} & pool.honest  # the victim is on the dispute's record...
    assert pool.events(QUARANTINED, FAILED) == []  # ... and nobody, honest or not, has a verdict against them
    assert pool.quarantined() == set()
