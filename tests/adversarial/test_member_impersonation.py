"""A member with a valid bundle, running modified code, tries to pass for someone it is not.

Pool "trust": Alpha serves blocks 0:2 and Beta 2:4 of the tiny chat model, Gamma pays, the pool's
coordinator is Coord. Mallory is a member in good standing: her bundle is valid, and she uses it
directly (her own node certificates, her own signed records, raw gRPC) instead of the shipped node.

- attack 4, endpoint hijack: Mallory announces a node of hers at Alpha's endpoint, claiming the whole
  model at a high speed, to be credited for Alpha's work;
- attack 6, free compute: Mallory opens sessions on nodes herself, and runs her own coordinator;
- attack 7, voiding a neighbour's pay: Mallory injects steps into a session she is not a hop of, so
  that Beta's tally exceeds what the coordinator observed.
Each must fail, while Gamma's requests keep getting the tokens a single process computes.
"""

from __future__ import annotations

import queue
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

from coop.errors import PeerError
from coop.launcher import COOP, LocalPool
from coop.model.manifest import Manifest
from coop.node.client import node_info
from coop.pool.bundle import Credentials, MemberBundle
from coop.receipts import ReceiptBody
from coop.swarm.announcement import stamp_announcement
from coop.swarm.directory import SwarmDirectory
from coop.wire.channels import GRPC_OPTIONS, ChannelSecurity
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from coop.wire.routes import encode_route, route_payload
from coop.wire.tensors import tensor_to_proto
from tests.pools import ServedPool, make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow
WAIT_S = 60.0
QUESTIONS = ["Count to three.", "Name a colour.", "Say hello to the pool."]
MAX_TOKENS = 6


class TrustPool(ServedPool):
    def credentials(self, institution: str, node_id: str | None = None) -> Credentials:
        return MemberBundle.load(self.bundles[institution]).credentials(node_id)

    def node(self, name: str) -> dict[str, str]:
        return self.pool.nodes[name].ready


@pytest.fixture(scope="module")
def trust(tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustPool]:
    disk = make_pool(
        tmp_path_factory.mktemp("trust") / "pool",
        "Trust pool",
        ("Alpha", "Beta", "Gamma", "Mallory"),
        coordinators=("Coord", "Auditor"),  # Auditor: a second pool coordinator, played by a test
        api_keys=("Gamma",),
    )
    bundles = disk.bundles
    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht()
        pool.start_nodes({"node-a": "0:2", "node-b": "2:4"}, {"node-a": bundles["Alpha"], "node-b": bundles["Beta"]})
        disk.start_coordinator(pool, "Coord", ["--receipt-interval-s", "0.3"])
        yield TrustPool(pool, disk.directory, bundles, disk.keys["Gamma"], Manifest.load(tiny_chat_model_dir))
    finally:
        pool.stop()


def _answers_match(trust: TrustPool, reference: Callable[[str, int], list[int]]) -> list[list[str]]:
    """Ask every question; each answer must be the single-process one. Returns the routes taken."""
    routes = []
    for question in QUESTIONS:
        answer = trust.greedy_chat(question, MAX_TOKENS)
        assert answer["coop"]["token_ids"] == reference(question, MAX_TOKENS), question
        routes.append([hop["node_id"] for hop in answer["coop"]["route"]])
    return routes


# ------------------------------------------------------------------------------------- attack 4


def test_a_member_cannot_hijack_another_members_endpoint(
    trust: TrustPool, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    mallory = trust.credentials("Mallory", "hijack")
    alpha = trust.node("node-a")
    fields = {
        "node_id": "hijack",
        "pool_id": mallory.pool_id,
        "model_hash": trust.manifest.content_hash,
        "start": 0,
        "end": trust.manifest.num_blocks,
        "endpoint": alpha["endpoint"],  # Alpha's node, announced as Mallory's
        "institution": "Mallory",
        "throughput_tps": 1e6,
        "free_cache_bytes": 1 << 30,
    }
    before = {b.institution: b.balance_flops for b in trust.ledger.balances()}
    receipts_before = len(trust.ledger.receipts())
    with SwarmDirectory.start([trust.pool.peer]) as directory:
        hijack = stamp_announcement(fields, now=time.time(), ttl_s=120, bundle=mallory)
        assert directory.announce(hijack)
        wait_for("the hijacking record to be in the DHT", lambda: _listed(directory, trust, "hijack"), WAIT_S)

        # What the coordinator meets when it dials the announced node: Alpha, who cannot prove to be "hijack".
        coordinator = trust.credentials("Coord")
        security = ChannelSecurity(coordinator.channel_credentials(), coordinator.node_tls_name)
        with pytest.raises(PeerError):
            node_info(alpha["endpoint"], security, institution="Mallory", node_id="hijack")
        assert node_info(alpha["endpoint"], security, institution="Alpha", node_id="node-a").node_id == "node-a"

        routes = _answers_match(trust, tiny_reference)
    assert all("hijack" not in route for route in routes), routes

    wait_for("the honest receipts to be booked", lambda: len(trust.ledger.receipts()) >= receipts_before + 6, WAIT_S)
    after = {b.institution: b.balance_flops for b in trust.ledger.balances()}
    assert after.get("Mallory", 0) == before.get("Mallory", 0) == 0
    assert after["Alpha"] > before.get("Alpha", 0) and after["Beta"] > before.get("Beta", 0)
    assert {r.provider for r in trust.ledger.receipts(limit=6)} == {"Alpha", "Beta"}


def _listed(directory: SwarmDirectory, trust: TrustPool, node_id: str) -> bool:
    nodes = directory.list_nodes(trust.credentials("Coord").pool_id, trust.manifest.content_hash)
    return any(node.node_id == node_id for node in nodes)


# ------------------------------------------------------------------------------------- attack 6


def _open_session(
    trust: TrustPool, credentials: Credentials, node: str, session_id: str, span: tuple[int, int]
) -> tuple[queue.Queue[pb.SessionControl | None], Iterator[pb.SessionEvent], grpc.Channel]:
    ready = trust.node(node)
    name = credentials.node_tls_name(ready["institution"], ready["node_id"])
    channel = grpc.secure_channel(
        ready["endpoint"],
        credentials.channel_credentials(),
        options=[*GRPC_OPTIONS, ("grpc.ssl_target_name_override", name)],
    )
    controls: queue.Queue[pb.SessionControl | None] = queue.Queue()
    opening = pb.SessionControl.Open(
        session_id=session_id, max_length=64, start=span[0], end=span[1], node_id=ready["node_id"]
    )
    controls.put(pb.SessionControl(open=opening))
    events = coop_pb2_grpc.NodeStub(channel).Session(iter(controls.get, None), timeout=120)
    return controls, events, channel


def test_only_pool_coordinators_open_sessions(
    trust: TrustPool, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    # Mallory's own node certificate (made from her valid bundle) opening a session on Alpha's node.
    controls, events, channel = _open_session(trust, trust.credentials("Mallory", "m-1"), "node-a", "free-ride", (0, 2))
    with channel:
        first = next(events)
        controls.put(None)
    assert first.WhichOneof("kind") == "failed" and first.failed.error.code == pb.UNAUTHENTICATED
    assert "not a coordinator" in first.failed.error.message

    # Mallory's own coordinator: her member bundle is not a coordinator's, so it does not start.
    started = subprocess.run(
        [
            *COOP,
            "coordinator",
            "start",
            "--model",
            str(trust.pool.model_dir),
            "--member",
            str(trust.bundles["Mallory"]),
            "--initial-peers",
            trust.pool.peer,
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode != 0
    assert "coordinator bundle" in started.stderr

    _answers_match(trust, tiny_reference)


# ------------------------------------------------------------------------------------- attack 7


def test_steps_come_only_from_the_route(trust: TrustPool, tiny_reference: Callable[[str, int], list[int]]) -> None:
    """Auditor (a pool coordinator) runs a session over node-a -> node-b; Mallory, who learnt its id and
    its signed route, tries to slip extra steps into node-b's share."""
    auditor = trust.credentials("Auditor")
    session_id = "audited-session"
    hops = [_hop(trust, "node-a", 0, 2), _hop(trust, "node-b", 2, 4)]
    route = encode_route(session_id, hops)
    signature = auditor.sign(route_payload(route))
    opened = [_open_session(trust, auditor, hop.node_id, session_id, (hop.start, hop.end)) for hop in hops]
    for _, events, _ in opened:
        assert next(events).WhichOneof("kind") == "opened"
    hidden_size = trust.manifest.hidden_size
    prompt = tensor_to_proto(torch.randn(1, 5, hidden_size, dtype=torch.float32))
    step = pb.StepRequest(session_id=session_id, step_id=1, hidden=prompt, route=route, route_signature=signature)
    assert not _forward(trust, auditor, "node-a", step).HasField("error")
    result = next(opened[1][1])
    assert result.WhichOneof("kind") == "result" and result.result.step_id == 1

    mallory = trust.credentials("Mallory", "m-2")
    one_token = tensor_to_proto(torch.randn(1, 1, hidden_size, dtype=torch.float32))
    attempts = {
        "the copied route, from a node not on it": (route, signature),
        "no signature": (route, b""),
        "a route naming Mallory, signed by Mallory": _own_route(trust, mallory, session_id),
    }
    for what, (forged_route, forged_signature) in attempts.items():
        injected = pb.StepRequest(
            session_id=session_id,
            step_id=99,
            hidden=one_token,
            start_position=5,
            route=forged_route,
            route_signature=forged_signature,
        )
        ack = _forward(trust, mallory, "node-b", injected)
        assert ack.error.code == pb.UNAUTHENTICATED, what

    for controls, _, channel in opened:
        controls.put(pb.SessionControl(close=pb.SessionControl.Close()))
        controls.put(None)
        channel.close()
    # Node-b's receipt, handed to the Auditor that opened the session, bills exactly the 5 tokens sent.
    receipts = wait_for(
        "node-b's receipt of the audited session", lambda: _receipts_of(trust, auditor, session_id), WAIT_S
    )
    assert [(b.node_id, b.prefill_tokens, b.decode_tokens) for b in receipts] == [("node-b", 5, 0)]
    _answers_match(trust, tiny_reference)


@dataclass(frozen=True)
class _Hop:
    node_id: str
    endpoint: str
    start: int
    end: int
    institution: str


def _hop(trust: TrustPool, node: str, start: int, end: int) -> _Hop:
    ready = trust.node(node)
    return _Hop(ready["node_id"], ready["endpoint"], start, end, ready["institution"])


def _own_route(trust: TrustPool, mallory: Credentials, session_id: str) -> tuple[bytes, bytes]:
    fake = _Hop("m-2", "127.0.0.1:9", 0, 2, "Mallory")
    route = encode_route(session_id, [fake, _hop(trust, "node-b", 2, 4)])
    return route, mallory.sign(route_payload(route))


def _forward(trust: TrustPool, credentials: Credentials, node: str, step: pb.StepRequest) -> pb.StepAck:
    ready = trust.node(node)
    name = credentials.node_tls_name(ready["institution"], ready["node_id"])
    options = [*GRPC_OPTIONS, ("grpc.ssl_target_name_override", name)]
    with grpc.secure_channel(ready["endpoint"], credentials.channel_credentials(), options=options) as channel:
        ack: pb.StepAck = coop_pb2_grpc.NodeStub(channel).Forward(step, timeout=30)
        return ack


def _receipts_of(trust: TrustPool, coordinator: Credentials, session_id: str) -> list[ReceiptBody]:
    ready = trust.node("node-b")
    name = coordinator.node_tls_name(ready["institution"], ready["node_id"])
    options = [*GRPC_OPTIONS, ("grpc.ssl_target_name_override", name)]
    with grpc.secure_channel(ready["endpoint"], coordinator.channel_credentials(), options=options) as channel:
        batch = coop_pb2_grpc.NodeStub(channel).Receipts(pb.ReceiptsRequest(limit=100), timeout=30)
    bodies = [ReceiptBody.from_bytes(r.body) for r in batch.receipts]
    return [b for b in bodies if b.session_id == session_id]
