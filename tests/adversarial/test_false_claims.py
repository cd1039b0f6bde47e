"""Attacks 3 and 4, false claims: a refusal or a report from one member is a claim, never proof.

Pools of the tiny chat model (4 blocks) whose honest nodes belong to Uni A and Uni B; Mallory runs
Coop's node modified, with Mallory's valid member bundle, so its announcements are validly signed.

- Sybil refusals (`refusing_node`): six made-up node ids announce the whole model as serving,
  answer pings at once, and refuse every session open as draining. Before this defence, their
  ids won every tie and four refused opens ended a request: nearly every request got 502. Now a
  refusal is routed around without using up failovers, a refusing institution leaves the session,
  and refusers lose priority.
- Blaming the next hop (`blaming_node`): a node reports its push onward as failed. Before, the
  coordinator suspected the honest next hop (which answered its probe) and dropped it from every
  route for 30 s: every request got 503. Now the claim only moves the session off the reporter.

Every answer must equal the single-process reference, and the coordinator's swarm view must keep
every honest node in its routes: a suspect is not among the nodes its admin API lists online.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from coop import launcher
from coop.launcher import LocalPool
from coop.node.client import node_info
from coop.pool.bundle import MemberBundle
from coop.pool.registry import API_KEYS_FILE, add_member, create_api_key, create_pool
from coop.wire.channels import ChannelSecurity
from tests.adversarial.refusing_node import REFUSED
from tests.chat_requests import answered_chat
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a colour.", "What is 2+2?", "Say hello."]
MAX_TOKENS = 6
BURST = 8
AFTER = 4
FAKES = {f"0-fake-{i}": "0:4" for i in range(6)}  # ids minted to sort before every honest one
WHOLE = ("whole-a", "whole-b")


@dataclass
class HostilePool:
    pool: LocalPool
    keys: list[str]  # two: a burst is more than one key may run at once
    admin_token: str
    honest: set[str]
    coordinator: Path

    def chat(self, i: int, reference: Callable[[str, int], list[int]]) -> list[str]:
        """The route of one greedy chat, after checking its answer against the reference."""
        question = QUESTIONS[i % len(QUESTIONS)]
        coop = answered_chat(self.pool.url, self.keys[i % 2], question, MAX_TOKENS, timeout_s=300)["coop"]
        assert coop["token_ids"] == reference(question, MAX_TOKENS)
        return [hop["node_id"] for hop in coop["route"]]

    def chats(self, reference: Callable[[str, int], list[int]]) -> list[list[str]]:
        """A burst of concurrent chats, then some one at a time: every one answered right."""
        for question in QUESTIONS:
            reference(question, MAX_TOKENS)  # computed before the burst, not while it runs
        with ThreadPoolExecutor(max_workers=BURST) as threads:
            routes = list(threads.map(lambda i: self.chat(i, reference), range(BURST)))
        return routes + [self.chat(i, reference) for i in range(AFTER)]

    def online(self) -> set[str]:
        """The nodes the coordinator's swarm view routes to now: suspects are not among them."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        nodes = httpx.get(f"{self.pool.url}/admin/api/nodes", headers=headers, timeout=30).raise_for_status().json()
        return {node["node_id"] for node in nodes if node["online"]}

    def steps_run(self, name: str, institution: str) -> int:
        credentials = MemberBundle.load(self.coordinator).credentials()
        security = ChannelSecurity(credentials.channel_credentials(), credentials.node_tls_name)
        endpoint = self.pool.nodes[name].ready["endpoint"]
        return node_info(endpoint, security, institution=institution, node_id=name).counters.steps_run


@contextmanager
def hostile_pool(
    model_dir: str, pool_dir: Path, honest: dict[str, tuple[str, str]], hostile: dict[str, str], program: str
) -> Iterator[HostilePool]:
    """`honest`: {node id: (span, institution)}; `hostile`: {node id: span} run by Mallory with `program`."""
    info = create_pool(pool_dir, "Hostile pool")
    assert info.admin_token is not None
    bundles = {name: add_member(pool_dir, name) for name in ("Uni A", "Uni B", "Mallory", "Client")}
    coordinator = add_member(pool_dir, "Coord", role="coordinator")
    keys = [create_api_key(pool_dir, "Client") for _ in range(2)]
    pool = LocalPool(model_dir)
    try:
        pool.start_dht(member=coordinator)
        pool.start_nodes({n: span for n, (span, _) in honest.items()}, {n: bundles[i] for n, (_, i) in honest.items()})
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(launcher, "COOP", [sys.executable, "-m", program])
            pool.start_nodes(hostile, dict.fromkeys(hostile, bundles["Mallory"]))
        with pytest.MonkeyPatch.context() as patch:  # spot checks would run steps on nodes off the routes
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_RATE", "0")
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_NEW_NODE_RATE", "0")
            pool.start_coordinator(
                member=coordinator, api_keys=pool_dir / API_KEYS_FILE, extra_args=["--pool-dir", str(pool_dir)]
            )
        hostile_pool = HostilePool(pool, keys, info.admin_token, set(honest), coordinator)
        everyone = set(honest) | set(hostile)
        wait_for("the coordinator to list every node", lambda: hostile_pool.online() >= everyone, timeout_s=120)
        yield hostile_pool
    finally:
        pool.stop()


def test_made_up_node_ids_that_refuse_every_session_cannot_starve_a_request(
    tiny_chat_model_dir: str, tmp_path: Path, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    honest = {"whole-a": ("0:4", "Uni A"), "whole-b": ("0:4", "Uni B")}
    with hostile_pool(tiny_chat_model_dir, tmp_path / "pool", honest, FAKES, "tests.adversarial.refusing_node") as hp:
        routes = hp.chats(tiny_reference)
        refused = sum(line == REFUSED for name in FAKES for line in hp.pool.nodes[name].lines)
        assert refused > 0, "the fakes were never tried: the attack did not happen"
        assert all(set(route) <= set(WHOLE) for route in routes), routes
        assert hp.online() >= hp.honest  # no honest node suspected
        suspected = [line for line in hp.pool.processes[-1].lines if "suspecting node" in line]
        assert not [line for line in suspected if any(f"node {name} " in line for name in honest)], suspected


def test_a_node_that_blames_its_next_hop_cannot_take_it_out_of_routes(
    tiny_chat_model_dir: str, tmp_path: Path, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    honest = {"head": ("0:2", "Uni A"), "tail": ("2:4", "Uni B")}
    blamer = {"blamer": "0:2"}
    with hostile_pool(tiny_chat_model_dir, tmp_path / "pool", honest, blamer, "tests.adversarial.blaming_node") as hp:
        routes = hp.chats(tiny_reference)
        assert hp.steps_run("blamer", "Mallory") > 0, "the blamer was never on a route: the attack did not happen"
        assert all(route == ["head", "tail"] for route in routes), routes
        assert hp.online() >= hp.honest  # the blamed tail, alive, is still routed to
        suspected = [line for line in hp.pool.processes[-1].lines if "suspecting node" in line]
        assert not [line for line in suspected if "node tail " in line or "node head " in line], suspected
