"""A real node service behind a real gRPC server in a thread, and the raw calls a coordinator makes to it.

Development mode (no bundle): every caller is one peer, its address, and nobody is checked, so
tests can drive the node with plain gRPC calls.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import torch

from coop.config import NodeSettings
from coop.model.engine import SpanEngine
from coop.node.limits import NodeLimits
from coop.node.service import NodeService
from coop.wire.channels import GRPC_OPTIONS
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from coop.wire.tensors import tensor_to_proto

NODE_ID = "fuzzed"
Controls = queue.Queue[pb.SessionControl | None]


def node_limits(**overrides: Any) -> NodeLimits:
    """The defaults of NodeSettings, with `overrides` (e.g. idle_timeout_s=1)."""
    return NodeLimits.from_settings(NodeSettings(model_dir=Path("."), **overrides))


class NodeInThread:
    """A real gRPC server around a NodeService, on its own event loop in a thread."""

    def __init__(self, engine: SpanEngine, control_socket: Path | None = None, **limits: Any) -> None:
        """`control_socket`: also serve on this unix socket, as `coop node start` does for its owner."""
        self.engine = engine
        self.control_socket = control_socket
        self.service: NodeService | None = None
        self.limits = node_limits(**limits)
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        service = self.service = NodeService(self.engine, node_id=NODE_ID, throughput_tps=1.0, limits=self.limits)
        server = grpc.aio.server(options=GRPC_OPTIONS)
        coop_pb2_grpc.add_NodeServicer_to_server(service, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        if self.control_socket is not None:
            server.add_insecure_port(f"unix:{self.control_socket}")
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

    def info(self) -> pb.NodeInfo:
        with grpc.insecure_channel(self.endpoint) as channel:
            info: pb.NodeInfo = coop_pb2_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=10)
            return info


def route(session_id: str, end: int = 6) -> bytes:
    """The one-hop route through this node: steps must carry it to reach the compute path."""
    hop = pb.Hop(endpoint="127.0.0.1:1", start=0, end=end, node_id=NODE_ID)
    return pb.Route(session_id=session_id, hops=[hop]).SerializeToString()


def start_session(
    stub: coop_pb2_grpc.NodeStub,
    session_id: str,
    max_length: int = 256,
    end: int = 6,
    consumer: str = "",
    **call: Any,
) -> tuple[Controls, Iterator[pb.SessionEvent]]:
    """Send the open (for `consumer`'s institution; "": the caller's); the node's first answer is the
    caller's to read."""
    controls: Controls = queue.Queue()
    open_message = pb.SessionControl.Open(
        session_id=session_id, max_length=max_length, start=0, end=end, consumer=consumer
    )
    controls.put(pb.SessionControl(open=open_message))
    events = stub.Session(iter(controls.get, None), timeout=call.pop("timeout", 300), **call)
    return controls, events


def open_session(
    stub: coop_pb2_grpc.NodeStub, session_id: str, max_length: int = 256, end: int = 6, consumer: str = ""
) -> tuple[Controls, Iterator[pb.SessionEvent]]:
    controls, events = start_session(stub, session_id, max_length, end, consumer)
    assert next(events).WhichOneof("kind") == "opened"
    return controls, events


def refused_open(
    stub: coop_pb2_grpc.NodeStub, session_id: str, max_length: int, end: int = 6, consumer: str = ""
) -> pb.Error:
    """The error of an open the node must refuse."""
    controls, events = start_session(stub, session_id, max_length, end, consumer, timeout=30)
    first = next(events)
    controls.put(None)
    assert first.WhichOneof("kind") == "failed", first
    return first.failed.error


def step(session_id: str, step_id: int, hidden: torch.Tensor, position: int, end: int = 6) -> pb.StepRequest:
    return pb.StepRequest(
        session_id=session_id,
        step_id=step_id,
        hidden=tensor_to_proto(hidden),
        start_position=position,
        route=route(session_id, end),
    )


def channel(node: NodeInThread) -> grpc.Channel:
    return grpc.insecure_channel(node.endpoint, options=GRPC_OPTIONS)
