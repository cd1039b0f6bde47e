"""The node's gRPC service: sessions as streams, steps pushed from node to node.

A step arrives by `Forward` (from the coordinator for the first node of a route, from the
previous node otherwise), or with the session's open (its first step, on the first node). The node
validates it, acknowledges at once, runs its blocks in a worker thread, then pushes the output to
the next hop, or, on the last node, sends it to the coordinator as a `result` event on the
session's stream: one network hop per node per token.

This module speaks gRPC (callers vetted, errors turned into status codes or replies) and hands each
call to the part that does the work: the session streams (coop/node/session_streams.py), the steps
(coop/node/step_runner.py, with coop/node/route_checks.py), the receipts
(coop/node/session_receipts.py). What a peer can make the node hold is bounded (coop/node/limits.py):
sessions and KV cache per coordinator, steps and their bytes per caller, a step no larger than its
session's room left, a few unread events per session, in bytes against the coordinator's budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import grpc

from coop.errors import CoopError, DialBackThrottled, InvalidInput, Unauthorized
from coop.model.engine import SpanEngine
from coop.node.dial_back import DialBacks
from coop.node.drain import ServingState, check_owner
from coop.node.limits import NodeLimits, PeerBudgets
from coop.node.receipt_batches import ReceiptWriter
from coop.node.route_checks import RouteChecks
from coop.node.session_receipts import SessionReceipts
from coop.node.session_streams import SessionStreams
from coop.node.sessions import peer_name
from coop.node.step_runner import StepRunner
from coop.pool.ca import ROLE_COORDINATOR
from coop.pool.identity import Identity
from coop.wire.channels import ChannelSecurity
from coop.wire.errors import error_to_proto
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc


class NodeService(coop_pb2_grpc.NodeServicer):
    def __init__(
        self,
        engine: SpanEngine,
        *,
        node_id: str,
        institution: str = "",
        throughput_tps: float,
        limits: NodeLimits,
        security: ChannelSecurity | None = None,
        authorize: Callable[[grpc.aio.ServicerContext], Identity | None] | None = None,
        receipts: ReceiptWriter | None = None,
        step_seconds: Callable[[float], None] | None = None,
        serving: ServingState | None = None,
    ) -> None:
        """`limits`: what one peer may make this node hold. `security`: how to reach the next hop.
        `authorize`: vets every caller (raises Unauthorized) and names it; None means development
        mode, where nobody is checked. `receipts`: signs a receipt for every batch of every session
        into the outbox (None in development mode). `step_seconds`: told how long each step took from its
        acceptance to its output (the node's latency histogram). `serving`: whether the node takes
        new sessions (coop/node/drain.py); its owner changes it through `Control`."""
        self.engine = engine
        self.node_id = node_id
        self.institution = institution
        self.throughput_tps = throughput_tps
        self.limits = limits
        self.serving = serving or ServingState(drain_deadline_s=0.0)
        self.receipts = SessionReceipts(receipts)
        self._authorize = authorize or (lambda context: None)
        self._budgets = PeerBudgets(limits)
        self._dial_backs = DialBacks(security or ChannelSecurity())
        self.streams = SessionStreams(
            engine, node_id=node_id, limits=limits, budgets=self._budgets, serving=self.serving, receipts=self.receipts
        )
        self.steps = StepRunner(
            engine,
            node_id=node_id,
            limits=limits,
            budgets=self._budgets,
            streams=self.streams,
            routes=RouteChecks(node_id, institution),
            receipts=self.receipts,
            security=security,
            step_seconds=step_seconds or (lambda seconds: None),
        )

    async def close(self) -> None:
        self.streams.close()
        await self.steps.close()

    def serve_span(self, engine: SpanEngine) -> None:
        """Serve `engine`'s span from now on, instead of the current one (a rebalance move, once drained)."""
        if self.session_count:
            raise InvalidInput(f"{self.session_count} sessions are still open: a node changes its span only drained")
        self.steps.serve(engine)
        self.engine = self.streams.engine = engine
        self.receipts.serve_manifest(engine.manifest)

    @property
    def session_count(self) -> int:
        return self.streams.count

    # -- Info -------------------------------------------------------------------------------

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.NodeInfo:
        try:
            self._authorize(context)
        except CoopError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return self.info()

    def info(self) -> pb.NodeInfo:
        """What the node serves, holds and has done: for `coop node status` and /metrics (on the event loop)."""
        limits, counters = self.limits, self.steps.counters
        return pb.NodeInfo(
            node_id=self.node_id,
            model_hash=self.engine.manifest.content_hash,
            start=self.engine.start,
            end=self.engine.end,
            throughput_tps=self.throughput_tps,
            free_cache_bytes=self.engine.free_cache_bytes,
            active_sessions=self.engine.session_count,
            counters=pb.NodeInfo.Counters(
                steps_run=counters.steps_run,
                pushes_sent=counters.pushes_sent,
                results_sent=counters.results_sent,
                limited=dict(self._budgets.limited),
            ),
            reserved_cache_bytes=self.engine.reserved_bytes,
            used_cache_bytes=self.engine.used_cache_bytes,
            steps_in_flight=self._budgets.steps_in_flight,
            in_flight_bytes=self._budgets.bytes_in_flight,
            queued_steps=self.steps.queued_steps,
            open_channels=self.steps.open_channels,
            state=self.serving.state,
            weight_layout=self.engine.weight_layout.describe(),
            limits=pb.NodeInfo.Limits(
                cache_budget_bytes=self.engine.cache_budget_bytes,
                sessions_per_peer=limits.max_sessions_per_peer,
                max_length=self.engine.context_length,
                in_flight_bytes_per_peer=limits.max_in_flight_bytes_per_peer,
                steps_in_flight_per_peer=limits.max_steps_in_flight_per_peer,
                steps_in_flight_per_session=limits.max_steps_in_flight_per_session,
                events_per_session=limits.max_events_per_session,
                idle_timeout_s=limits.idle_timeout_s,
                channels=limits.max_channels,
            ),
        )

    # -- DialBack (coop node doctor; coop/node/dial_back.py) ----------------------------------

    async def DialBack(self, request: pb.DialBackRequest, context: grpc.aio.ServicerContext) -> pb.DialBackReply:
        try:
            return await self._dial_backs.dial(self._authorize(context), request)
        except Unauthorized as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except DialBackThrottled as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except CoopError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        raise AssertionError("context.abort always raises")

    # -- Control (the owner's drain, pause, resume; coop/node/drain.py) -----------------------

    async def Control(self, request: pb.ControlRequest, context: grpc.aio.ServicerContext) -> pb.ControlReply:
        try:
            check_owner(context, lambda: self._authorize(context), self.institution)
        except CoopError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        actions = {
            pb.ControlRequest.DRAIN: self.serving.drain,
            pb.ControlRequest.PAUSE: self.serving.pause,
            pb.ControlRequest.RESUME: self.serving.resume,
        }
        if request.action not in actions:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "action must be DRAIN, PAUSE or RESUME")
        actions[request.action]()
        return pb.ControlReply(state=self.serving.state, active_sessions=self.session_count)

    # -- Session ----------------------------------------------------------------------------

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionControl], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SessionEvent]:
        events = self.streams.serve(
            request_iterator, lambda: self._authorize(context), _peer_host(context), self.steps.launch_first
        )
        async with contextlib.aclosing(events):  # the session is freed when its stream ends, however it ends
            async for event in events:
                yield event

    # -- Forward ----------------------------------------------------------------------------

    async def Forward(self, request: pb.StepRequest, context: grpc.aio.ServicerContext) -> pb.StepAck:
        try:
            caller = self._authorize(context)
            await self.streams.await_open(request.session_id)
            self.steps.launch(request, caller, peer_name(caller, _peer_host(context)))
        except CoopError as exc:
            return pb.StepAck(error=error_to_proto(exc))
        return pb.StepAck()

    # -- Receipts ---------------------------------------------------------------------------

    async def Receipts(self, request: pb.ReceiptsRequest, context: grpc.aio.ServicerContext) -> pb.ReceiptBatch:
        coordinator = await self._caller(context)
        return pb.ReceiptBatch(receipts=await self.receipts.pending(coordinator, request.limit))

    async def AckReceipts(self, request: pb.ReceiptAck, context: grpc.aio.ServicerContext) -> pb.ReceiptAckReply:
        coordinator = await self._caller(context)
        await self.receipts.settle(coordinator, list(request.booked), list(request.rejected))
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
