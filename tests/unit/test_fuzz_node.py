"""Fuzzing a running node: 10,000+ random and mutated messages, while a real session carries on.

The node (NodeService behind a real grpc.aio server on 127.0.0.1) must answer every message,
with a clear error where the message is bad, and a concurrent legitimate session must get exactly
the hidden states a local engine computes.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import uuid
from collections.abc import Iterator

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coop.model.engine import SpanEngine
from coop.node.service import NodeService
from coop.wire.channels import GRPC_OPTIONS
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from coop.wire.tensors import tensor_from_proto, tensor_to_proto
from tests.waiting import wait_for

HIDDEN = 64
RAW_MESSAGES = 6000
STRUCTURED_MESSAGES = 4000


class NodeInThread:
    """A real gRPC server around a NodeService, on its own event loop in a thread."""

    def __init__(self, engine: SpanEngine, max_sessions_per_peer: int = 128, max_cache_bytes_per_peer: int = 0) -> None:
        self.engine = engine
        self.max_sessions_per_peer = max_sessions_per_peer
        self.max_cache_bytes_per_peer = max_cache_bytes_per_peer or None
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        service = NodeService(
            self.engine,
            node_id="fuzzed",
            throughput_tps=1.0,
            max_sessions_per_peer=self.max_sessions_per_peer,
            max_cache_bytes_per_peer=self.max_cache_bytes_per_peer,
        )
        server = grpc.aio.server(options=GRPC_OPTIONS)
        coop_pb2_grpc.add_NodeServicer_to_server(service, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._ready.set()
        await self._stop.wait()
        await server.stop(1)
        await service.close()

    def __enter__(self) -> NodeInThread:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def node(tiny_llama_dir: str) -> Iterator[NodeInThread]:
    with NodeInThread(SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")) as running:
        yield running


FUZZ_SESSION = "fuzz-session"  # opened by the fuzzer itself, so mutated steps reach the compute path


def _route(session_id: str) -> bytes:
    """The one-hop route through this node: steps must carry it to reach the compute path."""
    hop = pb.Hop(endpoint="127.0.0.1:1", start=0, end=6, node_id="fuzzed")
    return pb.Route(session_id=session_id, hops=[hop]).SerializeToString()


def _open(
    stub: coop_pb2_grpc.NodeStub, session_id: str, max_length: int = 512
) -> tuple[queue.Queue[pb.SessionControl | None], Iterator[pb.SessionEvent]]:
    controls: queue.Queue[pb.SessionControl | None] = queue.Queue()
    open_message = pb.SessionControl.Open(session_id=session_id, max_length=max_length, start=0, end=6)
    controls.put(pb.SessionControl(open=open_message))
    events = stub.Session(iter(controls.get, None), timeout=300)
    assert next(events).WhichOneof("kind") == "opened"
    return controls, events


def _legit_session(endpoint: str, engine: SpanEngine, results: list[object], stop: threading.Event) -> None:
    try:
        _run_legit_session(endpoint, engine, results, stop)
    except Exception as exc:  # surfaced by the test's assertion on `results`
        results.append(exc)


def _run_legit_session(endpoint: str, engine: SpanEngine, results: list[object], stop: threading.Event) -> None:
    """Open a session and run steps until told to stop, checking every output against `engine`.

    Its id is random, as a coordinator's is: a peer cannot guess it.
    """
    session_id = uuid.uuid4().hex
    with grpc.insecure_channel(endpoint, options=GRPC_OPTIONS) as channel:
        stub = coop_pb2_grpc.NodeStub(channel)
        controls, events = _open(stub, session_id)
        reference = engine.open_session("reference", max_length=512)
        generator = torch.Generator().manual_seed(0)
        position, step_id = 0, 0
        while not stop.is_set() and position < 400:
            step_id += 1
            hidden = torch.randn(1, 1 if position else 5, HIDDEN, generator=generator)
            ack = stub.Forward(
                pb.StepRequest(
                    session_id=session_id,
                    step_id=step_id,
                    hidden=tensor_to_proto(hidden),
                    start_position=position,
                    route=_route(session_id),
                ),
                timeout=30,
            )
            assert not ack.HasField("error"), ack.error.message
            event = next(events)
            assert event.WhichOneof("kind") == "result", event
            expected = engine.step(reference, hidden, position)
            # equal up to float32 noise: the node may run this step packed with valid fuzz steps
            results.append(torch.allclose(tensor_from_proto(event.result.hidden), expected, rtol=1e-5, atol=1e-5))
            position += hidden.shape[1]
        controls.put(pb.SessionControl(close=pb.SessionControl.Close()))
        controls.put(None)


def test_fuzzed_node_stays_up_and_serves_a_real_session(node: NodeInThread, tiny_llama_dir: str) -> None:
    endpoint = f"127.0.0.1:{node.port}"
    reference_engine = SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")
    results: list[object] = []
    stop = threading.Event()
    legit = threading.Thread(target=_legit_session, args=(endpoint, reference_engine, results, stop))
    legit.start()
    answered = {"raw": 0, "structured": 0}
    try:
        with grpc.insecure_channel(endpoint, options=GRPC_OPTIONS) as channel:
            fuzz_controls, fuzz_events = _open(coop_pb2_grpc.NodeStub(channel), FUZZ_SESSION)
            drain = threading.Thread(target=lambda: sum(1 for _ in fuzz_events), daemon=True)
            drain.start()
            raw_forward = channel.unary_unary("/coop.v1.Node/Forward")
            raw_info = channel.unary_unary("/coop.v1.Node/Info")
            valid = pb.StepRequest(
                session_id=FUZZ_SESSION,
                step_id=10**9,
                hidden=tensor_to_proto(torch.zeros(1, 1, HIDDEN)),
                start_position=3,
                route=_route(FUZZ_SESSION),
            )
            valid_bytes = valid.SerializeToString()
            rng = random.Random(1234)
            for i in range(RAW_MESSAGES):
                if i % 2:
                    payload = rng.randbytes(rng.randrange(0, 200))
                else:  # a valid message with a few bytes flipped, cut or extended
                    data = bytearray(valid_bytes)
                    for _ in range(rng.randrange(1, 6)):
                        data[rng.randrange(len(data))] = rng.randrange(256)
                    payload = bytes(data[: rng.randrange(len(data) + 1)]) + rng.randbytes(rng.randrange(3))
                method = raw_info if i % 97 == 0 else raw_forward
                try:
                    reply = method(payload, timeout=10)
                    # an answer in the protocol: accepted, or an error with a reason
                    (pb.NodeInfo if method is raw_info else pb.StepAck).FromString(reply)
                except grpc.RpcError as exc:  # not a protobuf message at all: gRPC itself refuses it
                    assert exc.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), exc
                    assert "parsing" in (exc.details() or ""), exc
                answered["raw"] += 1
            _structured_fuzz(coop_pb2_grpc.NodeStub(channel), answered)
            fuzz_controls.put(None)
            drain.join(30)
    finally:
        stop.set()
        legit.join(120)
    assert answered["raw"] + answered["structured"] >= 10_000
    assert len(results) >= 5 and all(r is True for r in results), results[-3:]
    info = _info(endpoint)
    assert info.node_id == "fuzzed" and info.active_sessions == 0


def _info(endpoint: str) -> pb.NodeInfo:
    with grpc.insecure_channel(endpoint) as channel:
        return coop_pb2_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=10)


_dtypes = st.sampled_from(["float32", "float16", "bfloat16", "int64", "float64", "", "\x00", "float32 "])
_shapes = st.lists(st.integers(min_value=-3, max_value=1 << 40), max_size=5)
_tensors = st.builds(pb.Tensor, data=st.binary(max_size=600), dtype=_dtypes, shape=_shapes)
_hops = st.lists(
    st.builds(
        pb.Hop,
        endpoint=st.text(max_size=30),
        start=st.integers(-5, 40),
        end=st.integers(-5, 40),
        node_id=st.sampled_from(["fuzzed", "", "other"]),
    ),
    max_size=4,
)
_routes = st.one_of(
    st.builds(lambda hops: pb.Route(session_id=FUZZ_SESSION, hops=hops).SerializeToString(), _hops),
    st.just(_route(FUZZ_SESSION)),
    st.binary(max_size=64),
)
_requests = st.builds(
    pb.StepRequest,
    session_id=st.one_of(st.just(FUZZ_SESSION), st.text(max_size=200)),
    step_id=st.integers(0, 2**64 - 1),
    hidden=_tensors,
    start_position=st.integers(-(2**63), 2**63 - 1),
    route=_routes,
)


def _structured_fuzz(stub: coop_pb2_grpc.NodeStub, answered: dict[str, int]) -> None:
    @settings(max_examples=STRUCTURED_MESSAGES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=_requests)
    def fire(request: pb.StepRequest) -> None:
        ack = stub.Forward(request, timeout=10)
        if request.session_id != FUZZ_SESSION:
            assert ack.error.code == pb.UNKNOWN_SESSION
        elif ack.HasField("error"):
            assert ack.error.message
        # else: well-formed enough to run; any trouble is reported on the fuzzer's own session stream
        answered["structured"] += 1

    fire()


def test_sessions_per_peer_are_limited(tiny_llama_dir: str) -> None:
    engine = SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")
    with (
        NodeInThread(engine, max_sessions_per_peer=2) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}", options=GRPC_OPTIONS) as channel,
    ):
        stub = coop_pb2_grpc.NodeStub(channel)
        first, _ = _open(stub, "one")
        second = _open(stub, "two")  # keep a reference: a dropped stream closes its session
        controls: queue.Queue[pb.SessionControl | None] = queue.Queue()
        controls.put(pb.SessionControl(open=pb.SessionControl.Open(session_id="three", max_length=8, start=0, end=6)))
        refused = next(stub.Session(iter(controls.get, None), timeout=30))
        assert refused.failed.error.code == pb.SESSION_LIMIT_EXCEEDED
        assert "2 sessions" in refused.failed.error.message
        controls.put(None)
        first.put(None)  # closing one session frees a place
        wait_for(
            "the closed session to be freed",
            lambda: _info(f"127.0.0.1:{running.port}").active_sessions == 1,
            timeout_s=10,
            every_s=0.05,
        )
        _open(stub, "four")
        assert second[0] is not None


def test_cache_bytes_per_peer_are_limited(tiny_llama_dir: str) -> None:
    engine = SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")
    per_session = engine.reservation_bytes(8, 0, 6)
    with (
        NodeInThread(engine, max_cache_bytes_per_peer=per_session * 3) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}", options=GRPC_OPTIONS) as channel,
    ):
        stub = coop_pb2_grpc.NodeStub(channel)
        held = [_open(stub, name, max_length=8) for name in ("a", "b", "c")]
        controls: queue.Queue[pb.SessionControl | None] = queue.Queue()
        controls.put(pb.SessionControl(open=pb.SessionControl.Open(session_id="d", max_length=8, start=0, end=6)))
        refused = next(stub.Session(iter(controls.get, None), timeout=30))
        controls.put(None)
        assert refused.failed.error.code == pb.CACHE_BUDGET_EXCEEDED
        assert engine.free_cache_bytes == engine.cache_budget_bytes - 3 * per_session  # the node itself has room
        assert len(held) == 3
