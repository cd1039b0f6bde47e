"""A session's first step rides its open, and a step may overtake its session's open, against a real node
service over gRPC (development mode, the tiny model's blocks 0:6).

The coordinator opens every hop of a route at once and sends the first step with the first hop's open
(coop/pipeline/remote.py), so no round trip passes before the first token's compute starts; a push can
then reach a later hop before that hop has read its own open, and waits for it.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from coop.model.engine import SpanEngine
from coop.node import session_streams
from coop.node.session_streams import SessionStreams
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from coop.wire.tensors import tensor_from_proto, tensor_to_proto
from tests.node_harness import Controls, NodeInThread, channel, route, step
from tests.waiting import wait_for

HIDDEN = 64
LONG_GRACE_S = 60.0  # how long a step waits for its session's unread open, here: longer than the test


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str) -> SpanEngine:
    return SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: str) -> SpanEngine:
    return SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")


def hidden_states(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def open_with(stub: coop_pb2_grpc.NodeStub, session_id: str, first_step: pb.StepRequest) -> list[pb.SessionEvent]:
    """The node's first two events for an open that carries `first_step`."""
    controls: Controls = queue.Queue()
    opening = pb.SessionControl.Open(session_id=session_id, max_length=64, start=0, end=6, first_step=first_step)
    controls.put(pb.SessionControl(open=opening))
    events = stub.Session(iter(controls.get, None), timeout=60)
    answers = [next(events), next(events)]
    controls.put(None)
    return answers


def computed(reference: SpanEngine, session_id: str, *steps: torch.Tensor) -> torch.Tensor:
    """What the engine alone makes of `steps`, run one after the other in a session of its own."""
    reference.open_session(session_id, max_length=64)
    position = 0
    for hidden in steps:
        output = reference.step(session_id, hidden, position)
        position += hidden.shape[1]
    reference.close_session(session_id)
    return output


def test_the_first_step_runs_with_the_open(engine: SpanEngine, reference: SpanEngine) -> None:
    prompt = hidden_states(5, seed=1)
    with NodeInThread(engine) as node, channel(node) as ch:
        opened, result = open_with(coop_pb2_grpc.NodeStub(ch), "rides", step("rides", 1, prompt, 0))
        counters = node.info().counters
    assert opened.WhichOneof("kind") == "opened"
    assert result.WhichOneof("kind") == "result" and result.result.step_id == 1
    output = tensor_from_proto(result.result.hidden)
    assert torch.equal(output, computed(reference, "alone", prompt))
    assert counters.steps_run == 1 and counters.results_sent == 1


def test_a_refused_first_step_fails_after_the_open(engine: SpanEngine) -> None:
    wrong_width = pb.StepRequest(session_id="narrow", step_id=1, hidden=tensor_to_proto(torch.zeros(1, 1, 7)))
    wrong_width.route = route("narrow")
    with NodeInThread(engine) as node, channel(node) as ch:
        stub = coop_pb2_grpc.NodeStub(ch)
        cases = {
            "narrow": (wrong_width, pb.INVALID_TENSOR, "64"),
            "mine": (step("theirs", 7, hidden_states(1, 3), 0), pb.INVALID_REQUEST, "theirs"),
        }
        for session_id, (first_step, code, named) in cases.items():
            opened, failed = open_with(stub, session_id, first_step)
            assert opened.WhichOneof("kind") == "opened"
            assert failed.WhichOneof("kind") == "failed", failed
            assert failed.failed.step_id == first_step.step_id
            assert failed.failed.error.code == code and named in failed.failed.error.message
        assert node.info().counters.steps_run == 0


def test_a_step_waits_for_its_sessions_unread_open(
    engine: SpanEngine, reference: SpanEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_streams, "OPEN_GRACE_S", LONG_GRACE_S)  # a loaded machine cannot outwait it
    waiting = threading.Event()
    await_open = SessionStreams.await_open

    async def noted_await_open(streams: SessionStreams, session_id: str) -> None:
        waiting.set()
        await await_open(streams, session_id)

    monkeypatch.setattr(SessionStreams, "await_open", noted_await_open)
    prompt = hidden_states(4, seed=4)
    with NodeInThread(engine) as node, channel(node) as ch, ThreadPoolExecutor(1) as caller:
        stub = coop_pb2_grpc.NodeStub(ch)
        controls: Controls = queue.Queue()
        events = stub.Session(iter(controls.get, None), timeout=60)  # its open is not sent yet
        wait_for(
            "the node to hold the stream with an unread open", lambda: node.service.streams._unread_opens, 30, 0.01
        )
        ack = caller.submit(stub.Forward, step("late", 1, prompt, 0), timeout=30)
        assert waiting.wait(30), "the step never reached the node"
        assert not ack.done(), "the step was answered before its session's open arrived"
        controls.put(pb.SessionControl(open=pb.SessionControl.Open(session_id="late", max_length=64, start=0, end=6)))
        assert not ack.result().HasField("error")
        assert next(events).WhichOneof("kind") == "opened"
        result = next(events)
        controls.put(None)
    assert result.WhichOneof("kind") == "result"
    assert torch.equal(tensor_from_proto(result.result.hidden), computed(reference, "late-alone", prompt))


def test_a_step_for_a_session_never_opened_is_refused(engine: SpanEngine) -> None:
    nobody = step("nobody", 1, hidden_states(1, 5), 0)
    with NodeInThread(engine) as node, channel(node) as ch:
        stub = coop_pb2_grpc.NodeStub(ch)
        ack = stub.Forward(nobody, timeout=30)  # no open pending: refused at once, as ever
        assert ack.error.code == pb.UNKNOWN_SESSION and "nobody" in ack.error.message
        unread: Controls = queue.Queue()
        stream = stub.Session(iter(unread.get, None), timeout=60)  # an open that never comes
        ack = stub.Forward(nobody, timeout=30)  # refused once the wait is over
        assert ack.error.code == pb.UNKNOWN_SESSION and "nobody" in ack.error.message
        unread.put(None)
        stream.cancel()
