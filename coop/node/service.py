"""The node's gRPC service: sessions as streams, steps pushed from node to node.

A step arrives by `Forward` (from the coordinator for the first node of a route, from the
previous node otherwise). The node validates it, acknowledges at once, runs its blocks in a
worker thread, then pushes the output to the next hop, or, on the last node, sends it to the
coordinator as a `result` event on the session's stream: one network hop per node per token.
Anything that goes wrong after the ack is reported as a `failed` event on that stream, so one
session's trouble never reaches another session.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import torch

from coop.errors import (
    CacheBudgetExceeded,
    CoopError,
    InvalidInput,
    PeerError,
    SessionLimitExceeded,
    SpanOutOfRange,
    Unauthorized,
    UnknownSession,
)
from coop.model.engine import SpanEngine
from coop.node.batching import StepBatcher
from coop.node.metering import ReceiptWriter, SessionMeter
from coop.pool.ca import ROLE_COORDINATOR, ROLE_NODE, verify_signature
from coop.pool.identity import Identity
from coop.wire.channels import ChannelPool, ChannelSecurity
from coop.wire.errors import error_from_proto, error_to_proto
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from coop.wire.receipts import receipt_to_proto
from coop.wire.routes import decode_route, route_payload
from coop.wire.tensors import tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 30.0
DEFAULT_MAX_SESSIONS_PER_PEER = 128
# Steps of one session come one at a time from an honest coordinator; a few more allow for replays.
MAX_STEPS_IN_FLIGHT_PER_SESSION = 4
OPEN_TIMEOUT_S = 10.0
_SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass
class Counters:
    steps_run: int = 0
    pushes_sent: int = 0
    results_sent: int = 0


class NodeService(coop_pb2_grpc.NodeServicer):
    def __init__(
        self,
        engine: SpanEngine,
        *,
        node_id: str,
        institution: str = "",
        throughput_tps: float,
        security: ChannelSecurity | None = None,
        authorize: Callable[[grpc.aio.ServicerContext], Identity | None] | None = None,
        max_sessions_per_peer: int = DEFAULT_MAX_SESSIONS_PER_PEER,
        max_cache_bytes_per_peer: int | None = None,
        receipts: ReceiptWriter | None = None,
    ) -> None:
        """`security`: how to reach the next hop. `authorize`: vets every caller (raises Unauthorized)
        and names it; None means development mode, where nobody is checked. `max_sessions_per_peer`,
        `max_cache_bytes_per_peer` (default: the
        whole cache budget): so that one peer cannot take every session or all of the KV cache.
        `receipts`: signs a receipt for every session into the outbox (None in development mode)."""
        self.engine = engine
        self.node_id = node_id
        self.institution = institution
        self.throughput_tps = throughput_tps
        self.counters = Counters()
        self._authorize = authorize or (lambda context: None)
        self.max_sessions_per_peer = max_sessions_per_peer
        self.max_cache_bytes_per_peer = max_cache_bytes_per_peer or engine.cache_budget_bytes
        self._sessions_by_peer: collections.Counter[str] = collections.Counter()
        self._cache_by_peer: collections.Counter[str] = collections.Counter()
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._events: dict[str, asyncio.Queue[pb.SessionEvent | None]] = {}
        self._meters: dict[str, SessionMeter] = {}
        self._openers: dict[str, Identity] = {}  # session -> the coordinator that opened it
        self._routes: dict[str, tuple[bytes, bytes, list[pb.Hop]]] = {}  # last verified route per session
        self._receipts = receipts
        self._batcher = StepBatcher(engine)
        self._channels = ChannelPool(security)
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._channels.close()
        self._batcher.close()

    # -- Info -------------------------------------------------------------------------------

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.NodeInfo:
        try:
            self._authorize(context)
        except CoopError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return pb.NodeInfo(
            node_id=self.node_id,
            model_hash=self.engine.manifest.content_hash,
            start=self.engine.start,
            end=self.engine.end,
            throughput_tps=self.throughput_tps,
            free_cache_bytes=self.engine.free_cache_bytes,
            active_sessions=self.engine.session_count,
            counters=pb.NodeInfo.Counters(
                steps_run=self.counters.steps_run,
                pushes_sent=self.counters.pushes_sent,
                results_sent=self.counters.results_sent,
            ),
        )

    # -- Session ----------------------------------------------------------------------------

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionControl], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SessionEvent]:
        try:
            opener = self._authorize(context)
            if opener is not None:
                opener.require(ROLE_COORDINATOR)
            peer = opener.institution if opener is not None else _peer_host(context)
            first = await asyncio.wait_for(anext(request_iterator), OPEN_TIMEOUT_S)
            session_id, reserved = self._open(first, peer, secure=opener is not None)
            priority = first.open.priority if math.isfinite(first.open.priority) else 0.0
            meter = SessionMeter(first.open.start, first.open.end, peer, min(max(priority, 0.0), 1.0))
        except (CoopError, StopAsyncIteration, TimeoutError) as exc:
            error = exc if isinstance(exc, CoopError) else InvalidInput("the session stream must start with open")
            yield pb.SessionEvent(failed=pb.SessionEvent.Failed(step_id=0, error=error_to_proto(error)))
            return
        queue: asyncio.Queue[pb.SessionEvent | None] = asyncio.Queue()
        self._events[session_id] = queue
        self._meters[session_id] = meter
        if opener is not None:
            self._openers[session_id] = opener
        self._sessions_by_peer[peer] += 1
        self._cache_by_peer[peer] += reserved
        watcher = asyncio.create_task(self._watch_controls(request_iterator, queue))
        try:
            yield pb.SessionEvent(opened=pb.SessionEvent.Opened(session_id=session_id, cache_bytes=reserved))
            while (event := await queue.get()) is not None:
                yield event
        finally:
            watcher.cancel()
            self._sessions_by_peer[peer] -= 1
            self._cache_by_peer[peer] -= reserved
            self._events.pop(session_id, None)
            self._meters.pop(session_id, None)
            self._openers.pop(session_id, None)
            self._routes.pop(session_id, None)
            self.engine.evict(session_id)
            self._write_receipt(session_id, meter)

    def _write_receipt(self, session_id: str, meter: SessionMeter) -> None:
        if self._receipts is None:
            return
        try:
            self._receipts.write(session_id, meter)
        except Exception:  # the session is over either way; losing one receipt must not crash the node
            log.exception("could not write the receipt of session %s", session_id)

    def _open(self, control: pb.SessionControl, peer: str, *, secure: bool) -> tuple[str, int]:
        """Open the session the first control message asks for; returns its id and reserved cache bytes."""
        if control.WhichOneof("kind") != "open":
            raise InvalidInput("the session stream must start with open")
        request = control.open
        if secure and request.node_id != self.node_id:
            raise Unauthorized(f"this is node {self.node_id!r}, not {request.node_id!r}: check the directory")
        if not _SESSION_ID.match(request.session_id):
            raise InvalidInput("session_id must be 1-128 characters of [A-Za-z0-9_.:-]")
        if request.session_id in self._events:
            raise InvalidInput(f"session {request.session_id} is already open on this node")
        if not self.engine.start <= request.start < request.end <= self.engine.end:
            raise SpanOutOfRange(
                f"this node serves blocks {self.engine.start}:{self.engine.end}, not {request.start}:{request.end}"
            )
        # Checked here, with no await before the caller counts the session in, so that streams
        # opened side by side cannot all slip under the limit.
        if self._sessions_by_peer[peer] >= self.max_sessions_per_peer:
            raise SessionLimitExceeded(
                f"{peer} already has {self.max_sessions_per_peer} sessions open on this node, the limit per peer"
            )
        reserved = self.engine.reservation_bytes(request.max_length, request.start, request.end)
        used = self._cache_by_peer[peer]
        if used + reserved > self.max_cache_bytes_per_peer:
            raise CacheBudgetExceeded(
                reserved, max(self.max_cache_bytes_per_peer - used, 0), self.max_cache_bytes_per_peer
            )
        self.engine.open_session(
            request.session_id, max_length=request.max_length, start=request.start, end=request.end
        )
        return request.session_id, reserved

    async def _watch_controls(
        self, request_iterator: AsyncIterator[pb.SessionControl], queue: asyncio.Queue[pb.SessionEvent | None]
    ) -> None:
        """End the session on Close, on the end of the stream, or when the coordinator vanishes."""
        try:
            async for control in request_iterator:
                if control.WhichOneof("kind") == "close":
                    break
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            queue.put_nowait(None)

    # -- Forward ----------------------------------------------------------------------------

    async def Forward(self, request: pb.StepRequest, context: grpc.aio.ServicerContext) -> pb.StepAck:
        try:
            caller = self._authorize(context)
            queue, hidden, next_hops = self._accept(request, caller)
        except CoopError as exc:
            return pb.StepAck(error=error_to_proto(exc))
        self._in_flight[request.session_id] += 1
        task = asyncio.create_task(self._run_step(request, hidden, next_hops, queue))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pb.StepAck()

    def _accept(
        self, request: pb.StepRequest, caller: Identity | None
    ) -> tuple[asyncio.Queue[pb.SessionEvent | None], torch.Tensor, list[pb.Hop]]:
        queue = self._events.get(request.session_id)
        if queue is None:
            raise UnknownSession(f"no session {request.session_id} is open on node {self.node_id}")
        next_hops = self._route_after_me(request, caller)
        hidden = tensor_from_proto(
            request.hidden,
            expected_dtype=self.engine.dtype,
            expected_shape=(1, None, self.engine.hidden_size),
            name="hidden states",
        )
        if self._in_flight[request.session_id] >= MAX_STEPS_IN_FLIGHT_PER_SESSION:
            raise SessionLimitExceeded(
                f"session {request.session_id} already has {MAX_STEPS_IN_FLIGHT_PER_SESSION} steps in flight"
            )
        return queue, hidden, next_hops

    def _route_after_me(self, request: pb.StepRequest, caller: Identity | None) -> list[pb.Hop]:
        """The hops after this one on the step's route, once the route and the caller check out.

        In a pool the route must carry the signature of the coordinator that opened the session, and
        the caller must be this node's predecessor on it: that coordinator for the first hop, the
        previous node otherwise. (Verified routes are kept per session: the signature is checked once
        per route, not once per step.)
        """
        session_id = request.session_id
        known = self._routes.get(session_id)
        if known is not None and known[:2] == (request.route, request.route_signature):
            hops = known[2]
        else:
            hops = decode_route(request.route, session_id)
            opener = self._openers.get(session_id)
            if opener is not None:
                try:
                    verify_signature(opener.certificate, route_payload(request.route), request.route_signature)
                except Unauthorized as exc:
                    raise Unauthorized(f"the route of session {session_id} is not signed by its coordinator") from exc
                self._routes[session_id] = (request.route, request.route_signature, hops)
        mine = [i for i, hop in enumerate(hops) if (hop.node_id, hop.institution) == (self.node_id, self.institution)]
        if len(mine) != 1:
            raise InvalidInput(f"node {self.node_id} is not on the route of session {session_id}")
        index = mine[0]
        meter = self._meters.get(session_id)
        if meter is not None and (hops[index].start, hops[index].end) != (meter.start, meter.end):
            raise SpanOutOfRange(
                f"the route gives this node blocks {hops[index].start}:{hops[index].end}, "
                f"the session was opened for {meter.start}:{meter.end}"
            )
        if caller is not None:
            self._check_predecessor(session_id, caller, None if index == 0 else hops[index - 1])
        return hops[index + 1 :]

    def _check_predecessor(self, session_id: str, caller: Identity, previous: pb.Hop | None) -> None:
        if previous is None:
            opener = self._openers.get(session_id)
            if opener is None or caller.certificate != opener.certificate:
                raise Unauthorized(f"only the coordinator of session {session_id} may send it its first step")
        elif (caller.role, caller.institution, caller.node_id) != (ROLE_NODE, previous.institution, previous.node_id):
            raise Unauthorized(
                f"{caller.describe()} is not the node before this one on the route of session {session_id}"
            )

    async def _run_step(
        self,
        request: pb.StepRequest,
        hidden: torch.Tensor,
        next_hops: list[pb.Hop],
        queue: asyncio.Queue[pb.SessionEvent | None],
    ) -> None:
        session_id, step_id = request.session_id, request.step_id
        try:
            meter = self._meters.get(session_id)
            priority = meter.priority if meter else 0.0
            output = await self._batcher.step(session_id, hidden, request.start_position, priority=priority)
            if meter is not None:
                meter.tokens.add(hidden.shape[1])
            self.counters.steps_run += 1
            message = tensor_to_proto(output)
            if next_hops:
                await self._push(next_hops, request, message)
                self.counters.pushes_sent += 1
            else:
                result = pb.SessionEvent.Result(session_id=session_id, step_id=step_id, hidden=message)
                queue.put_nowait(pb.SessionEvent(result=result))
                self.counters.results_sent += 1
        except Exception as exc:
            if not isinstance(exc, CoopError):
                log.exception("step %s of session %s failed", step_id, session_id)
            failed = pb.SessionEvent.Failed(session_id=session_id, step_id=step_id, error=error_to_proto(exc))
            queue.put_nowait(pb.SessionEvent(failed=failed))
        finally:
            self._in_flight[session_id] -= 1
            if self._in_flight[session_id] <= 0:
                del self._in_flight[session_id]

    async def _push(self, next_hops: list[pb.Hop], step: pb.StepRequest, hidden: pb.Tensor) -> None:
        session_id, step_id, start_position = step.session_id, step.step_id, step.start_position
        route, route_signature = step.route, step.route_signature
        target = next_hops[0]
        request = pb.StepRequest(
            session_id=session_id,
            step_id=step_id,
            hidden=hidden,
            start_position=start_position,
            route=route,
            route_signature=route_signature,
        )
        try:
            stub = self._channels.stub(target.endpoint, target.institution, target.node_id)
            ack = await stub.Forward(request, timeout=PUSH_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise PeerError(f"next node {target.endpoint} is unreachable: {exc.code().name}") from exc
        if ack.HasField("error"):
            remote = error_from_proto(ack.error)
            remote_type = type(remote).__name__
            raise PeerError(
                f"next node {target.endpoint} refused the step ({remote_type}): {remote}", remote_type=remote_type
            ) from remote

    # -- Receipts ---------------------------------------------------------------------------

    async def Receipts(self, request: pb.ReceiptsRequest, context: grpc.aio.ServicerContext) -> pb.ReceiptBatch:
        coordinator = await self._caller(context)
        if self._receipts is None:
            return pb.ReceiptBatch()
        pending = await asyncio.to_thread(self._receipts.outbox.pending, coordinator, request.limit or 100)
        return pb.ReceiptBatch(receipts=[receipt_to_proto(rid, r) for rid, r in pending])

    async def AckReceipts(self, request: pb.ReceiptAck, context: grpc.aio.ServicerContext) -> pb.ReceiptAckReply:
        coordinator = await self._caller(context)
        if self._receipts is not None:
            await asyncio.to_thread(
                self._receipts.outbox.acknowledge, coordinator, list(request.booked), list(request.rejected)
            )
        return pb.ReceiptAckReply()

    async def _caller(self, context: grpc.aio.ServicerContext) -> str:
        """Who is asking: receipts are handed to, and settled by, the coordinator that opened the session."""
        try:
            caller = self._authorize(context)
            return _peer_host(context) if caller is None else caller.require(ROLE_COORDINATOR).institution
        except CoopError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            raise  # unreachable: abort raises


def _peer_host(context: grpc.aio.ServicerContext) -> str:
    """'ipv4:127.0.0.1:53012' -> 'ipv4:127.0.0.1': without TLS, a peer is its address."""
    return context.peer().rsplit(":", 1)[0]
