"""Attack 5, route capture: a node announces the whole model at 1e12 tokens/s to take every route.

Pool (the tiny chat model, 4 blocks): Uni A's honest "head" 0:2 and "tail" 2:4, Uni B's honest
"whole" 0:4, and Mallory's "liar" 0:4, which runs Coop's node with Mallory's valid member bundle
but claims 1e12 tokens/s while being slower than the others (`lying_node`): its announcements are validly signed. Before
this defence, the coordinator priced the liar's compute at 1e-12 s a token and sent it every
request of an idle pool. Now it believes no claim faster than what it has measured, prices a
node it has measured by what it did, and counts every route it chose as load on its nodes: a
burst of concurrent chats spreads over the honest nodes too, and once the liar has been measured
an idle pool routes around it. Every answer equals the single-process reference throughout.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from coop import launcher
from coop.launcher import LocalPool
from coop.node.client import node_info
from coop.pool.bundle import MemberBundle
from coop.pool.registry import create_api_key
from coop.wire.channels import ChannelSecurity
from coop.wire.generated import coop_pb2 as pb
from tests.adversarial.lying_node import CLAIMED_TPS
from tests.chat_requests import answered_chat
from tests.pools import make_pool

pytestmark = pytest.mark.slow

HONEST = {"head": "0:2", "tail": "2:4", "whole": "0:4"}
QUESTIONS = ["What is the capital of France?", "Name a colour.", "What is 2+2?", "Say hello."]
BURST = 12
IDLE = 4
MAX_TOKENS = 8


@dataclass
class CapturePool:
    pool: LocalPool
    keys: list[str]  # two: a burst of BURST requests is more than one key may run at once
    security: ChannelSecurity  # the coordinator's, to read the nodes' counters


@pytest.fixture(scope="module")
def capture(tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CapturePool]:
    pool_dir = tmp_path_factory.mktemp("capture") / "pool"
    disk = make_pool(pool_dir, "Capture pool", ("Uni A", "Uni B", "Mallory", "Client"), coordinators=("Coord",))
    bundles, coordinator = disk.bundles, disk.bundles["Coord"]
    keys = [create_api_key(pool_dir, "Client") for _ in range(2)]
    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht(member=coordinator)
        owners = {"head": bundles["Uni A"], "tail": bundles["Uni A"], "whole": bundles["Uni B"]}
        pool.start_nodes(HONEST, owners)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(launcher, "COOP", [sys.executable, "-m", "tests.adversarial.lying_node"])
            pool.start_nodes({"liar": "0:4"}, {"liar": bundles["Mallory"]})
        with pytest.MonkeyPatch.context() as patch:  # spot checks would run steps on nodes off the routes
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_RATE", "0")
            patch.setenv("COOP_COORDINATOR_SPOT_CHECK_NEW_NODE_RATE", "0")
            pool.start_coordinator(member=coordinator, api_keys=pool_dir / "api_keys.json")
        credentials = MemberBundle.load(coordinator).credentials()
        yield CapturePool(pool, keys, ChannelSecurity(credentials.channel_credentials(), credentials.node_tls_name))
    finally:
        pool.stop()


def _info(capture: CapturePool, name: str) -> pb.NodeInfo:
    ready = capture.pool.nodes[name].ready
    return node_info(ready["endpoint"], capture.security, institution=ready["institution"], node_id=name)


def _chat(capture: CapturePool, question: str, reference: Callable[[str, int], list[int]], key: int = 0) -> list[str]:
    """The route of one greedy chat, after checking its answer against the reference."""
    coop = answered_chat(capture.pool.url, capture.keys[key], question, MAX_TOKENS, timeout_s=300)["coop"]
    assert coop["token_ids"] == reference(question, MAX_TOKENS)
    return [hop["node_id"] for hop in coop["route"]]


def _steps_run(capture: CapturePool) -> dict[str, int]:
    return {name: _info(capture, name).counters.steps_run for name in HONEST}


def test_a_claim_of_1e12_tokens_per_second_captures_no_routes(
    capture: CapturePool, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    liar = _info(capture, "liar")
    assert liar.throughput_tps == CLAIMED_TPS and (liar.start, liar.end) == (0, 4)  # the lie is told
    for question in QUESTIONS:
        tiny_reference(question, MAX_TOKENS)  # computed before the burst, not while it runs
    steps_before = _steps_run(capture)

    with ThreadPoolExecutor(max_workers=BURST) as threads:
        burst = list(
            threads.map(lambda i: _chat(capture, QUESTIONS[i % len(QUESTIONS)], tiny_reference, i % 2), range(BURST))
        )
    # Never measured, the liar is priced like the median claim, so the first request tries it;
    # the routes chosen since count as load, so the others spread over the honest nodes.
    assert 1 <= sum("liar" in route for route in burst) < BURST, burst
    served = {name for name, steps in _steps_run(capture).items() if steps > steps_before[name]}
    assert served == {node_id for route in burst for node_id in route} - {"liar"}, burst

    idle = [_chat(capture, QUESTIONS[i % len(QUESTIONS)], tiny_reference) for i in range(IDLE)]
    # Measured now, the liar is priced by what it did: an idle pool does not give it every request.
    assert sum("liar" in route for route in idle) < IDLE, idle
