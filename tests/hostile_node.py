"""A node that misbehaves on every step, and the session stream a coordinator holds with it: fakes of
the coordinator's channel and stub, so a real RemoteChain runs against them."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc
import torch

from coop.errors import InvalidTensor
from coop.swarm.node_key import NodeKey
from coop.swarm.routing import Hop
from coop.wire.errors import error_to_proto
from coop.wire.generated import coop_pb2 as pb
from coop.wire.tensors import tensor_to_proto


class FakeSessionCall:
    """The coordinator's end of one node's session stream; `forward` runs a first step that comes with the
    open, as the node's Forward would (a refusal comes back as a failed event after `opened`)."""

    def __init__(self, forward: Callable[[pb.StepRequest], Awaitable[pb.StepAck]] | None = None) -> None:
        self.events: asyncio.Queue[object] = asyncio.Queue()
        self._forward = forward

    async def write(self, control: pb.SessionControl) -> None:
        if control.WhichOneof("kind") == "open":
            opened = pb.SessionEvent.Opened(session_id=control.open.session_id)
            self.events.put_nowait(pb.SessionEvent(opened=opened))
            if self._forward is not None and control.open.HasField("first_step"):
                step = control.open.first_step
                ack = await self._forward(step)
                if ack.HasField("error"):
                    failed = pb.SessionEvent.Failed(session_id=step.session_id, step_id=step.step_id, error=ack.error)
                    self.events.put_nowait(pb.SessionEvent(failed=failed))

    async def read(self) -> object:
        return await self.events.get()

    async def done_writing(self) -> None:
        self.events.put_nowait(grpc.aio.EOF)

    def cancel(self) -> None:
        self.events.put_nowait(grpc.aio.EOF)


class HostileNode:
    """The one node of a route (and the ChannelPool that reaches it): every step meets `misbehaviour`.

    "refuses": the node rejects the step with InvalidTensor; "fails": it accepts the step, then
    reports InvalidTensor on its session stream; "sends_nan": it returns hidden states full of NaN.
    """

    node_id = "12D3KooWhostile"

    def __init__(self, misbehaviour: str, hidden_size: int, num_blocks: int) -> None:
        self.misbehaviour = misbehaviour
        self.hidden_size = hidden_size
        self.hop = Hop(self.node_id, "127.0.0.1:1", 0, num_blocks)
        self.load: Counter[NodeKey] = Counter()  # the SwarmView half
        self.suspected: list[tuple[str, str]] = []
        self.call = FakeSessionCall()

    # SwarmView
    async def route(self, exclude: object = (), avoid_institutions: object = ()) -> list[Hop]:
        return [self.hop]

    def suspect(self, key: tuple[str, str]) -> None:
        self.suspected.append(key)

    def refused(self, key: tuple[str, str]) -> None:
        pass

    def served(self, hops: object) -> None:
        pass

    def release(self, hops: object) -> None:
        pass

    def revoked(self) -> frozenset[str]:
        return frozenset()

    def leaving(self) -> set[tuple[str, str]]:
        return set()

    # ChannelPool and the node's stub
    def stub(self, endpoint: str, institution: str = "", node_id: str = "") -> HostileNode:
        return self

    def Session(self) -> FakeSessionCall:
        self.call = FakeSessionCall(self.forward_first_step)
        return self.call

    async def forward_first_step(self, request: pb.StepRequest) -> pb.StepAck:
        return await self.Forward(request, timeout=0)

    async def Forward(self, request: pb.StepRequest, timeout: float) -> pb.StepAck:
        error = error_to_proto(InvalidTensor("hidden states contain NaN or Inf"))
        if self.misbehaviour == "refuses":
            return pb.StepAck(error=error)
        if self.misbehaviour == "fails":
            failed = pb.SessionEvent.Failed(session_id=request.session_id, step_id=request.step_id, error=error)
            self.call.events.put_nowait(pb.SessionEvent(failed=failed))
        else:
            n = len(request.hidden.data) // (4 * self.hidden_size)  # float32
            nan = tensor_to_proto(torch.full((1, n, self.hidden_size), float("nan")))
            result = pb.SessionEvent.Result(session_id=request.session_id, step_id=request.step_id, hidden=nan)
            self.call.events.put_nowait(pb.SessionEvent(result=result))
        return pb.StepAck()

    async def Info(self, request: pb.InfoRequest, timeout: float) -> pb.NodeInfo:
        return pb.NodeInfo()
