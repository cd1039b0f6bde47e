"""A hostile (or buggy) pool coordinator tries to exhaust a node that everyone's sessions need.

Pool "exhaust": Alpha serves blocks 0:2 and Beta 2:4 of the tiny chat model (each node with a
1 MiB KV-cache budget), Gamma pays, Coord is the pool's honest coordinator. Rogue holds a valid
coordinator certificate of the same pool (only coordinators open sessions on nodes) and talks to
the nodes over raw gRPC:

- (a) the idle-stream KV pin: open sessions with a huge max_length, or as many as the node takes
  (all of its cache: the cache is work-conserving), and never step them, so that the node's cache is
  full when Gamma's sessions need it: Gamma, below its share, takes the room of Rogue's idle ones;
- (b) the in-flight flood: many large steps whose pushes the next hop (Rogue's accomplice, a node
  certificate of member Mallory, on a route Rogue signed) never answers, so that they stay in the
  node's memory.
Each must be refused or expire, while Gamma's chats keep getting the tokens a single process computes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from coop.launcher import LocalPool
from coop.model.manifest import Manifest
from coop.node.client import node_info
from coop.pool.bundle import Credentials, MemberBundle
from coop.wire.channels import GRPC_OPTIONS, ChannelSecurity
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from coop.wire.routes import encode_route, route_payload
from coop.wire.tensors import tensor_to_proto
from tests.chat_requests import answered_chat
from tests.pools import make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow
WAIT_S = 60.0
QUESTIONS = ["Count to three.", "Name a colour."]
MAX_TOKENS = 6
CACHE_BUDGET_MB = 1
IDLE_TIMEOUT_S = 5
IN_FLIGHT_BYTES_PER_PEER = 64 << 10
CONTEXT = 512  # the tiny chat model's max_position_embeddings
PIN_LENGTH = 1_398_101  # what pinned the whole default budget of a node before the limits


@dataclass
class ExhaustPool:
    pool: LocalPool
    bundles: dict[str, Path]
    key: str
    manifest: Manifest

    def credentials(self, name: str, node_id: str | None = None) -> Credentials:
        return MemberBundle.load(self.bundles[name]).credentials(node_id)

    def node(self, name: str) -> dict[str, str]:
        return self.pool.nodes[name].ready

    def info(self, name: str) -> pb.NodeInfo:
        coordinator = self.credentials("Coord")
        security = ChannelSecurity(coordinator.channel_credentials(), coordinator.node_tls_name)
        ready = self.node(name)
        return node_info(ready["endpoint"], security, institution=ready["institution"], node_id=ready["node_id"])

    def chats_match(self, reference: Callable[[str, int], list[int]]) -> None:
        for question in QUESTIONS:
            answer = answered_chat(self.pool.url, self.key, question, MAX_TOKENS)
            assert answer["coop"]["token_ids"] == reference(question, MAX_TOKENS), question


@pytest.fixture(scope="module")
def exhaust(tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExhaustPool]:
    disk = make_pool(
        tmp_path_factory.mktemp("exhaust") / "pool",
        "Exhaust pool",
        ("Alpha", "Beta", "Gamma", "Mallory"),
        coordinators=("Coord", "Rogue"),
        api_keys=("Gamma",),
    )
    bundles = disk.bundles
    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht()
        with pytest.MonkeyPatch.context() as env:  # the node's limits, small enough to reach in a test
            env.setenv("COOP_NODE_IDLE_TIMEOUT_S", str(IDLE_TIMEOUT_S))
            env.setenv("COOP_NODE_MAX_IN_FLIGHT_BYTES_PER_PEER", str(IN_FLIGHT_BYTES_PER_PEER))
            pool.start_nodes(
                {"node-a": "0:2", "node-b": "2:4"},
                {"node-a": bundles["Alpha"], "node-b": bundles["Beta"]},
                extra_args=["--cache-budget-mb", str(CACHE_BUDGET_MB)],
            )
        disk.start_coordinator(pool, "Coord")
        yield ExhaustPool(pool, bundles, disk.keys["Gamma"], Manifest.load(tiny_chat_model_dir))
    finally:
        pool.stop()


class RawCoordinator:
    """Rogue's own client: its coordinator certificate, raw gRPC, no limits of its own."""

    def __init__(self, exhaust: ExhaustPool, node: str) -> None:
        self.credentials = exhaust.credentials("Rogue")
        self.ready = exhaust.node(node)
        name = self.credentials.node_tls_name(self.ready["institution"], self.ready["node_id"])
        self.channel = grpc.secure_channel(
            self.ready["endpoint"],
            self.credentials.channel_credentials(),
            options=[*GRPC_OPTIONS, ("grpc.ssl_target_name_override", name)],
        )
        self.stub = coop_pb2_grpc.NodeStub(self.channel)
        # every stream Rogue opened, kept: a stream that is dropped ends its session
        self.streams: list[tuple[queue.Queue[pb.SessionControl | None], Iterator[pb.SessionEvent]]] = []

    def open(
        self, session_id: str, max_length: int, span: tuple[int, int]
    ) -> tuple[pb.SessionEvent, Iterator[pb.SessionEvent]]:
        controls: queue.Queue[pb.SessionControl | None] = queue.Queue()
        opening = pb.SessionControl.Open(
            session_id=session_id, max_length=max_length, start=span[0], end=span[1], node_id=self.ready["node_id"]
        )
        controls.put(pb.SessionControl(open=opening))
        events = self.stub.Session(iter(controls.get, None), timeout=300)
        self.streams.append((controls, events))
        return next(events), events

    def close(self) -> None:
        for controls, _ in self.streams:
            controls.put(None)
        self.channel.close()


# ------------------------------------------------------------------------------------- (a) KV pin


def test_idle_streams_cannot_pin_a_nodes_cache(
    exhaust: ExhaustPool, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    rogue = RawCoordinator(exhaust, "node-a")
    try:
        first, _ = rogue.open("pin-huge", PIN_LENGTH, (0, 2))
        assert first.failed.error.code == pb.CONTEXT_LENGTH_EXCEEDED
        assert f"context of {CONTEXT} tokens" in first.failed.error.message

        # As many full-context sessions as node-a gives Rogue, all left idle.
        held = []
        for i in range(64):
            first, events = rogue.open(f"pin-{i}", CONTEXT, (0, 2))
            if first.WhichOneof("kind") != "opened":
                break
            held.append(events)
        assert first.failed.error.code == pb.CACHE_BUDGET_EXCEEDED, first  # a capacity refusal
        pinned = exhaust.info("node-a")
        budget = pinned.limits.cache_budget_bytes
        assert budget == CACHE_BUDGET_MB << 20 and len(held) >= 2
        assert pinned.reserved_cache_bytes > budget - budget // len(held)  # Rogue alone filled the node

        exhaust.chats_match(tiny_reference)  # Gamma's sessions take the room of Rogue's idle ones

        # Rogue's idle sessions are closed, for Gamma or once idle: the node ends each stream with why.
        for events in held:
            dropped = next(events)
            assert dropped.failed.error.code == pb.SESSION_DROPPED, dropped
            message = dropped.failed.error.message
            assert f"had no step for {IDLE_TIMEOUT_S} s" in message or "below its fair share" in message
        freed = wait_for(
            "node-a to free Rogue's sessions",
            lambda: (info := exhaust.info("node-a")).reserved_cache_bytes == 0 and info,
            WAIT_S,
        )
        assert freed.counters.limited["context_length"] >= 1
        assert freed.counters.limited["cache_share"] >= 1
        assert freed.counters.limited["idle_timeout_s"] + freed.counters.limited["cache_share"] >= len(held)
    finally:
        rogue.close()
    exhaust.chats_match(tiny_reference)


# ------------------------------------------------------------------------------------- (b) flood


class Sink(coop_pb2_grpc.NodeServicer):
    """Rogue's accomplice at the next hop: takes the pushes and does not answer until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.received = 0

    def Forward(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepAck:
        self.received += 1
        self.release.wait(WAIT_S)
        return pb.StepAck()


def test_a_flood_of_steps_is_held_to_the_floods_own_budget(
    exhaust: ExhaustPool, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=GRPC_OPTIONS)
    coop_pb2_grpc.add_NodeServicer_to_server(sink, server)
    port = server.add_secure_port("127.0.0.1:0", exhaust.credentials("Mallory", "sink").server_credentials())
    server.start()
    rogue = RawCoordinator(exhaust, "node-a")
    hidden_size = exhaust.manifest.hidden_size
    tokens = 64
    step_bytes = tokens * hidden_size * 4  # float32
    sessions = 12
    assert sessions * step_bytes > IN_FLIGHT_BYTES_PER_PEER
    try:
        acks = []
        for i in range(sessions):
            session_id = f"flood-{i}"
            first, _ = rogue.open(session_id, tokens, (0, 2))
            assert first.WhichOneof("kind") == "opened", first
            hops = [
                pb.Hop(endpoint=rogue.ready["endpoint"], start=0, end=2, node_id="node-a", institution="Alpha"),
                pb.Hop(endpoint=f"127.0.0.1:{port}", start=2, end=4, node_id="sink", institution="Mallory"),
            ]
            route = encode_route(session_id, hops)
            step = pb.StepRequest(
                session_id=session_id,
                step_id=1,
                hidden=tensor_to_proto(torch.randn(1, tokens, hidden_size)),
                route=route,
                route_signature=rogue.credentials.sign(route_payload(route)),
            )
            acks.append(rogue.stub.Forward(step, timeout=30))
        flooded = exhaust.info("node-a")
        accepted = [ack for ack in acks if not ack.HasField("error")]
        refused = [ack for ack in acks if ack.HasField("error")]
        assert len(accepted) == IN_FLIGHT_BYTES_PER_PEER // step_bytes
        assert {ack.error.code for ack in refused} == {pb.IN_FLIGHT_LIMIT_EXCEEDED}
        assert f"the {IN_FLIGHT_BYTES_PER_PEER:,} bytes one peer may have in flight" in refused[0].error.message
        assert flooded.in_flight_bytes <= IN_FLIGHT_BYTES_PER_PEER
        assert flooded.counters.limited["max_in_flight_bytes_per_peer"] == len(refused)

        exhaust.chats_match(tiny_reference)  # Coord's steps are Coord's budget, not Rogue's

        sink.release.set()
        wait_for("node-a to finish the flood", lambda: exhaust.info("node-a").in_flight_bytes == 0, WAIT_S)
        assert sink.received == len(accepted)
    finally:
        sink.release.set()
        rogue.close()
        server.stop(0)
