"""A node rewinds a session's cache only within the latest step's drafts (coop/node/step_runner.py),
against a real node service over gRPC: a hop cannot make its successor recompute what it already kept."""

from __future__ import annotations

import torch

from coop.model.engine import SpanEngine
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from tests.node_harness import NodeInThread, channel, open_session, step

HIDDEN = 64
PROMPT = 4
DRAFTS = 2


def hidden_states(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def rewinding(session_id: str, step_id: int, tokens: int, position: int) -> pb.StepRequest:
    request = step(session_id, step_id, hidden_states(tokens, step_id), position)
    request.rewind = True
    return request


def test_rewinds_beyond_the_latest_steps_drafts_are_refused(tiny_llama_dir: str) -> None:
    engine = SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")
    with NodeInThread(engine) as node, channel(node) as ch:
        stub = coop_pb2_grpc.NodeStub(ch)
        _controls, events = open_session(stub, "spec", max_length=64)

        def accepted(request: pb.StepRequest) -> None:
            ack = stub.Forward(request, timeout=10)
            assert not ack.HasField("error"), ack.error
            assert next(events).WhichOneof("kind") == "result"

        def refused(request: pb.StepRequest) -> pb.Error:
            ack = stub.Forward(request, timeout=10)
            assert ack.HasField("error")
            return ack.error

        accepted(step("spec", 1, hidden_states(PROMPT, 1), 0))  # the prompt
        assert refused(rewinding("spec", 2, 1, 0)).code == pb.INVALID_POSITIONS  # the whole latest step
        accepted(step("spec", 3, hidden_states(1 + DRAFTS, 3), PROMPT))  # a token and its drafts
        accepted(rewinding("spec", 4, 1 + DRAFTS, PROMPT + 1))  # one draft kept, one dropped
        error = refused(rewinding("spec", 4, 1 + DRAFTS, PROMPT + 2))  # the same step id again
        assert error.code == pb.INVALID_POSITIONS and "only the draft tokens" in error.message
        assert refused(rewinding("spec", 5, 1, PROMPT + 1)).code == pb.INVALID_POSITIONS  # the kept token
        accepted(rewinding("spec", 6, 1, PROMPT + 2))  # the latest step's drafts: fine
        info = node.info()
    assert info.counters.limited["rewind"] == 3
