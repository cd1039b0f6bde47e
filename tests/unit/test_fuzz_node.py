"""Fuzzing a running node: 10,000+ random and mutated messages, while a real session carries on.

The node (NodeService behind a real grpc.aio server on 127.0.0.1) must answer every message,
with a clear error where the message is bad, and a concurrent legitimate session must get exactly
the hidden states a local engine computes.
"""

from __future__ import annotations

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
from coop.wire.channels import GRPC_OPTIONS
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from coop.wire.tensors import tensor_from_proto, tensor_to_proto
from tests.node_harness import NODE_ID, NodeInThread, open_session, route, step

HIDDEN = 64
RAW_MESSAGES = 6000
STRUCTURED_MESSAGES = 4000


@pytest.fixture(scope="module")
def node(tiny_llama_dir: str) -> Iterator[NodeInThread]:
    with NodeInThread(SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")) as running:
        yield running


FUZZ_SESSION = "fuzz-session"  # opened by the fuzzer itself, so mutated steps reach the compute path
MAX_LENGTH = 256  # the tiny model's context


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
        controls, events = open_session(stub, session_id, MAX_LENGTH)
        reference = engine.open_session("reference", max_length=MAX_LENGTH)
        generator = torch.Generator().manual_seed(0)
        position, step_id = 0, 0
        while not stop.is_set() and position < MAX_LENGTH - 5:
            step_id += 1
            hidden = torch.randn(1, 1 if position else 5, HIDDEN, generator=generator)
            ack = stub.Forward(step(session_id, step_id, hidden, position), timeout=30)
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
    endpoint = node.endpoint
    reference_engine = SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")
    results: list[object] = []
    stop = threading.Event()
    legit = threading.Thread(target=_legit_session, args=(endpoint, reference_engine, results, stop))
    legit.start()
    answered = {"raw": 0, "structured": 0}
    try:
        with grpc.insecure_channel(endpoint, options=GRPC_OPTIONS) as channel:
            fuzz_controls, fuzz_events = open_session(coop_pb2_grpc.NodeStub(channel), FUZZ_SESSION)
            drain = threading.Thread(target=lambda: sum(1 for _ in fuzz_events), daemon=True)
            drain.start()
            raw_forward = channel.unary_unary("/coop.v1.Node/Forward")
            raw_info = channel.unary_unary("/coop.v1.Node/Info")
            valid = pb.StepRequest(
                session_id=FUZZ_SESSION,
                step_id=10**9,
                hidden=tensor_to_proto(torch.zeros(1, 1, HIDDEN)),
                start_position=3,
                route=route(FUZZ_SESSION),
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
    info = node.info()
    assert info.node_id == NODE_ID and info.active_sessions == 0


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
    st.just(route(FUZZ_SESSION)),
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
