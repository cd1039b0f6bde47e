"""A route's session streams, one per hop: open one, forward its events, and probe hops for life.

`coop.pipeline.remote.RemoteChain` decides what to do with a route; this module is the gRPC under it.
Events from every hop of a route go into one queue, tagged with the hop's index; a stream that ends
puts None, so the chain learns the hop is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from coop.errors import PeerError
from coop.swarm.node_key import NodeKey
from coop.swarm.routing import Hop
from coop.wire.channels import ChannelPool
from coop.wire.errors import error_from_proto
from coop.wire.generated import coop_pb2 as pb

OPEN_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 1.0

Events = asyncio.Queue[tuple[int, pb.SessionEvent | None]]  # (hop index, event; None: the stream ended)


@dataclass
class HopStream:
    hop: Hop
    call: grpc.aio.StreamStreamCall
    reader: asyncio.Task[None]


async def open_hop_stream(
    channels: ChannelPool, hop: Hop, open_msg: pb.SessionControl.Open, index: int, events: Events, leaving: set[int]
) -> HopStream:
    """Open the session on one hop; once it answers `opened`, its events flow into `events` (see `read_events`)."""
    call = channels.stub(hop.endpoint, hop.institution, hop.node_id).Session()
    try:
        await call.write(pb.SessionControl(open=open_msg))
        first = await asyncio.wait_for(call.read(), OPEN_TIMEOUT_S)
    except (grpc.aio.AioRpcError, TimeoutError) as exc:
        call.cancel()
        raise PeerError(f"node {hop.node_id} at {hop.endpoint} did not open the session") from exc
    if first is grpc.aio.EOF or not isinstance(first, pb.SessionEvent) or first.WhichOneof("kind") != "opened":
        call.cancel()
        error = error_from_proto(first.failed.error) if isinstance(first, pb.SessionEvent) else None
        remote_type = type(error).__name__ if error is not None else None
        raise PeerError(f"node {hop.node_id} refused the session: {error}", remote_type=remote_type) from error
    return HopStream(hop, call, asyncio.create_task(read_events(index, call, events, leaving)))


async def read_events(index: int, call: grpc.aio.StreamStreamCall, events: Events, leaving: set[int]) -> None:
    """Forward a hop's events into the queue of the route it belongs to (never a later route's);
    note in that route's `leaving` that the hop is leaving."""
    try:
        while (event := await call.read()) is not grpc.aio.EOF:
            if isinstance(event, pb.SessionEvent) and event.WhichOneof("kind") == "draining":
                leaving.add(index)
                continue
            await events.put((index, event))  # waits while the queue is full
    except grpc.aio.AioRpcError:
        pass
    except asyncio.CancelledError:  # the chain closed the stream: the queue may be full and unread
        with contextlib.suppress(asyncio.QueueFull):
            events.put_nowait((index, None))
        return
    await events.put((index, None))  # the stream is gone: the node died or dropped us


async def unanswering(channels: ChannelPool, hops: Sequence[Hop]) -> set[NodeKey]:
    """The hops that do not answer Info within a second: what the coordinator sees for itself, where
    a node's report of another is only a claim."""

    async def alive(hop: Hop) -> bool:
        try:
            stub = channels.stub(hop.endpoint, hop.institution, hop.node_id)
            await stub.Info(pb.InfoRequest(), timeout=PROBE_TIMEOUT_S)
            return True
        except grpc.aio.AioRpcError:
            return False

    answers = await asyncio.gather(*(alive(h) for h in hops))
    return {hop.key for hop, ok in zip(hops, answers, strict=True) if not ok}
