"""Every limit on what a peer can make a node hold, against a real node service over gRPC.

Each test drives a node (NodeService behind a grpc.aio server on 127.0.0.1, development mode:
every caller is the peer 127.0.0.1) past one limit, checks the refusal is typed and says which
limit, that the node counts it under the setting's name in Info, and that honest work goes on
with the hidden states a local engine computes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
import torch

from coop.cli.node import status_rows
from coop.errors import (
    ContextLengthExceeded,
    CoopError,
    InFlightLimitExceeded,
    PeerCacheLimitExceeded,
    SessionDropped,
    SessionLimitExceeded,
)
from coop.model.engine import SpanEngine
from coop.node.limits import PeerBudgets
from coop.wire.errors import error_from_proto, error_to_proto
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from coop.wire.tensors import tensor_from_proto
from tests.node_harness import NODE_ID, NodeInThread, channel, node_limits, open_session, refused_open, step
from tests.waiting import wait_for

HIDDEN = 64
CONTEXT = 256  # the tiny model's max_position_embeddings
STEP_TOKENS = 8
STEP_BYTES = STEP_TOKENS * HIDDEN * 4  # float32 hidden states
RELEASE_TIMEOUT_S = 60.0


@pytest.fixture
def engine(tiny_llama_dir: str) -> SpanEngine:
    return SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")


@pytest.fixture
def reference(tiny_llama_dir: str) -> SpanEngine:
    return SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")


@contextmanager
def held_in_engine(engine: SpanEngine) -> Iterator[threading.Event]:
    """Steps wait inside the engine until the yielded event is set: they stay in flight meanwhile."""
    release = threading.Event()
    run = engine.step

    def held_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not release.wait(RELEASE_TIMEOUT_S):
            raise TimeoutError("the test never released the engine")
        return run(*args, **kwargs)

    engine.step = held_step  # type: ignore[method-assign]
    try:
        yield release
    finally:
        release.set()
        del engine.step


def hidden_states(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def result_of(events: Iterator[pb.SessionEvent]) -> torch.Tensor:
    event = next(events)
    assert event.WhichOneof("kind") == "result", event
    return tensor_from_proto(event.result.hidden)


def test_an_open_beyond_the_models_context_is_refused(engine: SpanEngine) -> None:
    with pytest.raises(ContextLengthExceeded, match="context of 256"):
        engine.open_session(max_length=CONTEXT + 1)
    with NodeInThread(engine) as node, channel(node) as ch:
        error = refused_open(coop_pb2_grpc.NodeStub(ch), "pin", max_length=1_398_101)
        info = node.info()
    assert error.code == pb.CONTEXT_LENGTH_EXCEEDED and "context of 256 tokens" in error.message
    assert info.counters.limited["context_length"] == 1
    assert info.reserved_cache_bytes == 0 and info.limits.max_length == CONTEXT


def test_one_coordinator_alone_fills_the_whole_cache(tiny_llama_dir: str) -> None:
    per_session = SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu").reservation_bytes(64, 0, 6)
    engine = SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu", cache_budget_bytes=16 * per_session)
    with NodeInThread(engine) as node, channel(node) as ch:
        stub = coop_pb2_grpc.NodeStub(ch)
        held = [open_session(stub, f"s{i}", max_length=64) for i in range(16)]
        error = refused_open(stub, "s16", max_length=64)
        info = node.info()
    assert error.code == pb.CACHE_BUDGET_EXCEEDED, error  # a capacity refusal: the node is full
    assert info.free_cache_bytes == 0 and info.reserved_cache_bytes == 16 * per_session
    assert info.counters.limited["cache_budget_bytes"] == 1
    assert len(held) == 16


def test_contending_institutions_get_equal_shares_of_a_full_cache(tiny_llama_dir: str) -> None:
    per_session = SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu").reservation_bytes(64, 0, 6)
    engine = SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu", cache_budget_bytes=16 * per_session)
    with NodeInThread(engine) as node, channel(node) as ch:
        stub = coop_pb2_grpc.NodeStub(ch)
        first = [open_session(stub, f"a{i}", max_length=64, consumer="A") for i in range(16)]
        second = [open_session(stub, f"b{i}", max_length=64, consumer="B") for i in range(8)]
        over_b = refused_open(stub, "b8", max_length=64, consumer="B")
        over_a = refused_open(stub, "a16", max_length=64, consumer="A")
        info = node.info()
        for _, events in first[:8]:  # A's longest idle sessions made room, each told why
            failed = next(events)
            assert failed.WhichOneof("kind") == "failed" and failed.failed.error.code == pb.SESSION_DROPPED
            assert "below its fair share" in failed.failed.error.message
    assert over_b.code == over_a.code == pb.PEER_CACHE_LIMIT_EXCEEDED, (over_a, over_b)
    assert "fair share" in over_b.message
    assert info.active_sessions == 16 and info.free_cache_bytes == 0
    assert info.counters.limited["cache_share"] == 8 + 2
    assert len(second) == 8


def test_sessions_per_peer_are_limited(engine: SpanEngine) -> None:
    with NodeInThread(engine, max_sessions_per_peer=2) as node, channel(node) as ch:
        stub = coop_pb2_grpc.NodeStub(ch)
        first, _ = open_session(stub, "one")
        second = open_session(stub, "two")  # keep a reference: a dropped stream closes its session
        error = refused_open(stub, "three", max_length=8)
        assert error.code == pb.SESSION_LIMIT_EXCEEDED and "2 sessions" in error.message
        first.put(None)  # closing one session frees a place
        wait_for("the closed session to be freed", lambda: node.info().active_sessions == 1, 10, every_s=0.05)
        open_session(stub, "four")
        assert node.info().counters.limited["max_sessions_per_peer"] == 1
        assert second[0] is not None


def test_idle_sessions_are_closed_by_the_node(engine: SpanEngine, reference: SpanEngine) -> None:
    hidden = hidden_states(STEP_TOKENS, seed=1)
    with held_in_engine(engine) as release, NodeInThread(engine, idle_timeout_s=2) as node, channel(node) as ch:
        stub = coop_pb2_grpc.NodeStub(ch)
        _, busy = open_session(stub, "busy")
        assert not stub.Forward(step("busy", 1, hidden, 0), timeout=10).HasField("error")
        idle_controls, idle = open_session(stub, "idle")
        dropped = next(idle)  # the node ends the idle session by itself
        with pytest.raises(StopIteration):
            next(idle)
        info = node.info()
        release.set()  # a session with a step in flight is not idle: it carries on
        output = result_of(busy)
    assert dropped.failed.error.code == pb.SESSION_DROPPED
    assert "had no step for 2 s" in dropped.failed.error.message and "freed" in dropped.failed.error.message
    assert info.counters.limited["idle_timeout_s"] == 1
    assert info.active_sessions == 1 and info.reserved_cache_bytes == engine.reservation_bytes(CONTEXT, 0, 6)
    assert torch.equal(output, reference.step(reference.open_session(max_length=CONTEXT), hidden, 0))
    idle_controls.put(None)


def test_a_coordinator_that_does_not_read_loses_its_session(engine: SpanEngine) -> None:
    """Its events pile up on the node until the limit; then the node frees the session, not its memory."""
    # A client that takes in at most ~1 KiB it has not read: the node's writes block after a few events.
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    with NodeInThread(engine) as node, grpc.insecure_channel(node.endpoint, options=options) as ch:
        stub = coop_pb2_grpc.NodeStub(ch)
        controls, events = open_session(stub, "deaf")
        codes = []
        for step_id in range(1, 2001):  # each step fails (wrong position): a small event, never read
            ack = stub.Forward(step("deaf", step_id, hidden_states(1, step_id), 7), timeout=10)
            codes.append(ack.error.code if ack.HasField("error") else None)
            if ack.error.code == pb.UNKNOWN_SESSION:
                break
        info = node.info()
        unread = list(events)  # what was on its way, then why the stream ended
        controls.put(None)
    assert codes[-1] == pb.UNKNOWN_SESSION, codes[-5:]
    assert info.counters.limited["max_events_per_session"] == 1
    assert (info.active_sessions, info.reserved_cache_bytes, info.in_flight_bytes) == (0, 0, 0)
    assert unread[-1].failed.error.code == pb.SESSION_DROPPED
    assert "left 16 events unread" in unread[-1].failed.error.message


@pytest.mark.parametrize(
    ("limit", "value", "says"),
    [
        ("max_in_flight_bytes_per_peer", 3 * STEP_BYTES, "bytes of steps and results in flight"),
        ("max_steps_in_flight_per_peer", 3, "3 steps in flight on this node, the limit per peer"),
    ],
)
def test_steps_in_flight_are_limited_per_peer(
    engine: SpanEngine, reference: SpanEngine, limit: str, value: int, says: str
) -> None:
    # steps run one at a time, so that each output equals the reference's single step bit for bit
    limits = {limit: value, "max_steps_in_flight_per_session": 2, "max_batch_steps": 1}
    inputs = {(s, i): hidden_states(STEP_TOKENS, seed=10 * s + i) for s in (1, 2) for i in (0, 1, 2)}
    with held_in_engine(engine) as release, NodeInThread(engine, **limits) as node, channel(node) as ch:
        stub = coop_pb2_grpc.NodeStub(ch)
        streams = {s: open_session(stub, f"s{s}")[1] for s in (1, 2)}

        def forward(s: int, i: int) -> pb.StepAck:
            ack: pb.StepAck = stub.Forward(step(f"s{s}", i + 1, inputs[s, i], i * STEP_TOKENS), timeout=10)
            return ack

        assert not forward(1, 0).HasField("error") and not forward(1, 1).HasField("error")
        per_session = forward(1, 2)
        assert not forward(2, 0).HasField("error")
        per_peer = forward(2, 1)
        held = node.info()
        release.set()
        outputs = {(s, i): result_of(streams[s]) for s, i in ((1, 0), (1, 1), (2, 0))}
        after = node.info()
    assert per_session.error.code == pb.IN_FLIGHT_LIMIT_EXCEEDED
    assert "session s1 already has 2 steps in flight" in per_session.error.message
    assert per_peer.error.code == pb.IN_FLIGHT_LIMIT_EXCEEDED and says in per_peer.error.message
    assert (held.steps_in_flight, held.in_flight_bytes, held.queued_steps) == (3, 3 * STEP_BYTES, 2)
    assert held.counters.limited[limit] == 1 and held.counters.limited["max_steps_in_flight_per_session"] == 1
    assert (after.steps_in_flight, after.in_flight_bytes) == (0, 0)
    for s in (1, 2):
        session = reference.open_session(max_length=CONTEXT)
        for i in (0, 1) if s == 1 else (0,):
            assert torch.equal(outputs[s, i], reference.step(session, inputs[s, i], i * STEP_TOKENS)), (s, i)


def test_a_step_beyond_its_sessions_room_is_refused_when_it_arrives(engine: SpanEngine, reference: SpanEngine) -> None:
    with held_in_engine(engine) as release, NodeInThread(engine) as node, channel(node) as ch:
        stub = coop_pb2_grpc.NodeStub(ch)
        _, events = open_session(stub, "short", max_length=STEP_TOKENS)
        too_big = stub.Forward(step("short", 1, hidden_states(STEP_TOKENS + 1, 0), 0), timeout=10)
        fits = hidden_states(STEP_TOKENS, 1)
        assert not stub.Forward(step("short", 2, fits, 0), timeout=10).HasField("error")
        # the room is taken by the step in flight, before it runs
        no_room = stub.Forward(step("short", 3, hidden_states(1, 2), STEP_TOKENS), timeout=10)
        release.set()
        output = result_of(events)
        info = node.info()
    assert too_big.error.code == pb.SESSION_LIMIT_EXCEEDED
    assert f"a step of {(STEP_TOKENS + 1) * HIDDEN * 4:,} bytes does not fit session short" in too_big.error.message
    assert no_room.error.code == pb.SESSION_LIMIT_EXCEEDED and "(0 tokens)" in no_room.error.message
    assert info.counters.limited["max_length"] == 2
    assert torch.equal(output, reference.step(reference.open_session(max_length=STEP_TOKENS), fits, 0))


def test_node_status_shows_the_limits_and_how_often_they_were_hit(engine: SpanEngine) -> None:
    with NodeInThread(engine, idle_timeout_s=30, max_events_per_session=5) as node, channel(node) as ch:
        refused_open(coop_pb2_grpc.NodeStub(ch), "pin", max_length=CONTEXT * 10)
        rows = dict(status_rows(node.info()))
    assert rows["limits hit"] == "context_length 1"
    assert "closed after 30 s idle or 5 unread events" in rows["sessions"]
    assert "shared equally per institution when full, 256 tokens per session" in rows["KV cache"]
    assert "256.0 MiB per peer" in rows["steps in flight"]


class Sink(coop_pb2_grpc.NodeServicer):
    """A next hop that takes pushes and does not answer until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Forward(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepAck:
        self.release.wait(RELEASE_TIMEOUT_S)
        return pb.StepAck()


def test_a_step_being_pushed_no_longer_takes_room(engine: SpanEngine) -> None:
    """Once run, a step's tokens are in the cache: its push to the next hop must not count them twice."""
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    coop_pb2_grpc.add_NodeServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    hops = [
        pb.Hop(endpoint="127.0.0.1:1", start=0, end=6, node_id=NODE_ID),
        pb.Hop(endpoint=f"127.0.0.1:{port}", node_id="sink"),
    ]
    two_hops = pb.Route(session_id="pushed", hops=hops).SerializeToString()
    try:
        with NodeInThread(engine) as node, channel(node) as ch:
            stub = coop_pb2_grpc.NodeStub(ch)
            controls, _ = open_session(stub, "pushed", max_length=STEP_TOKENS + 1)  # held: it is the session
            prefill = step("pushed", 1, hidden_states(STEP_TOKENS, 0), 0)
            prefill.route = two_hops
            assert not stub.Forward(prefill, timeout=10).HasField("error")
            wait_for("the prefill to run", lambda: node.info().counters.steps_run == 1, 10, every_s=0.05)
            decode = step("pushed", 2, hidden_states(1, 1), STEP_TOKENS)
            decode.route = two_hops
            ack = stub.Forward(decode, timeout=10)
            pushing = node.info()
            sink.release.set()
            controls.put(None)
    finally:
        sink.release.set()
        server.stop(0)
    assert not ack.HasField("error"), ack.error.message
    assert pushing.counters.pushes_sent == 0 and pushing.steps_in_flight >= 1


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PeerCacheLimitExceeded("coordinator 'Rogue'", 4096, 8192, 10_000), pb.PEER_CACHE_LIMIT_EXCEEDED),
        (InFlightLimitExceeded("session s already has 4 steps in flight"), pb.IN_FLIGHT_LIMIT_EXCEEDED),
        (SessionDropped("session s had no step for 300 s"), pb.SESSION_DROPPED),
        (ContextLengthExceeded("max_length 9,999 is beyond this model's context"), pb.CONTEXT_LENGTH_EXCEEDED),
    ],
    ids=lambda value: type(value).__name__,
)
def test_the_limits_errors_keep_their_type_across_the_wire(error: CoopError, code: int) -> None:
    message = error_to_proto(error)
    back = error_from_proto(pb.Error.FromString(message.SerializeToString()))
    assert (message.code, type(back), str(back)) == (code, type(error), str(error))


def test_budgets_give_back_all_they_take() -> None:
    budgets = PeerBudgets(node_limits(max_sessions_per_peer=2, max_in_flight_bytes_per_peer=100))
    budgets.take_session("p")
    budgets.take_session("p")
    with pytest.raises(SessionLimitExceeded):
        budgets.take_session("p")
    budgets.take_session("q")  # another peer has its own sessions
    budgets.take_step("q", 70)
    with pytest.raises(InFlightLimitExceeded):
        budgets.take_step("q", 31)
    assert not budgets.take_result("q", 31)  # a result that does not fit closes its session instead
    budgets.give_step("q", 70)
    assert budgets.take_result("q", 31)
    assert (budgets.steps_in_flight, budgets.bytes_in_flight) == (0, 31)
    budgets.give_bytes("q", 31)
    for peer in ("p", "p", "q"):
        budgets.give_session(peer)
    assert budgets._held == {}
    assert budgets.limited == {"max_sessions_per_peer": 1, "max_in_flight_bytes_per_peer": 1}
