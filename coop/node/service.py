"""The node's gRPC service: sessions as streams, steps pushed from node to node.

A step arrives by `Forward` (from the coordinator for the first node of a route, from the
previous node otherwise), or with the session's open (its first step, on the first node). The node
validates it, acknowledges at once, runs its blocks in a worker thread, then pushes the output to
the next hop, or, on the last node, sends it to the coordinator as a `result` event on the
session's stream: one network hop per node per token. Anything that goes wrong after the ack is
reported as a `failed` event on that stream, so one session's trouble never reaches another session.

What a peer can make the node hold is bounded (coop/node/limits.py): sessions and KV cache per
coordinator, steps and their bytes per caller, a step no larger than its session's room left, a
few unread events per session, in bytes against the coordinator's budget. A session idle past
`idle_timeout_s`, or whose coordinator lets its events pile up, is closed by the node, which frees
its cache at once. (Its stream ends once the coordinator reads to the failure at its end; until
then it counts as one of that coordinator's sessions, so unread streams stay bounded too.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import torch

from coop.errors import (
    CacheBudgetExceeded,
    ContextLengthExceeded,
    CoopError,
    DialBackThrottled,
    InFlightLimitExceeded,
    InvalidInput,
    NodeDraining,
    PeerError,
    SessionDropped,
    SessionLimitExceeded,
    SpanOutOfRange,
    Unauthorized,
    UnknownSession,
)
from coop.model.engine import SpanEngine
from coop.node.batching import StepBatcher
from coop.node.dial_back import DialBacks
from coop.node.drain import ServingState, check_owner
from coop.node.limits import NodeLimits, PeerBudgets
from coop.node.metering import ReceiptWriter, SessionMeter
from coop.node.sessions import LiveSession, held_bytes
from coop.pool.ca import ROLE_COORDINATOR, ROLE_NODE, verify_signature
from coop.pool.identity import Identity
from coop.wire.channels import ChannelPool, ChannelSecurity
from coop.wire.errors import error_from_proto, error_to_proto
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from coop.wire.receipts import receipt_to_proto
from coop.wire.routes import decode_route, route_payload
from coop.wire.sketches import check_dims, sketch_to_proto
from coop.wire.tensors import tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 30.0
OPEN_TIMEOUT_S = 10.0
OPEN_GRACE_S = 1.0  # the longest a step for an unknown session waits for unread opens (see `_await_open`)
MAX_REAP_INTERVAL_S = 5.0
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
        self.counters = Counters()
        self._authorize = authorize or (lambda context: None)
        self._budgets = PeerBudgets(limits, engine.cache_budget_bytes)
        self._sessions: dict[str, LiveSession] = {}
        self._receipts = receipts
        self._step_seconds = step_seconds or (lambda seconds: None)
        self._batcher = self._batcher_of(engine)
        self._channels = ChannelPool(security, max_channels=limits.max_channels)
        self._dial_backs = DialBacks(security or ChannelSecurity())
        self._tasks: set[asyncio.Task[None]] = set()
        self._unread_opens = 0  # session streams whose first message is not read yet
        self._open_read = asyncio.Event()  # set (and replaced) each time one is read
        self._reaper: asyncio.Task[None] | None = None
        self.serving = serving or ServingState(drain_deadline_s=0.0)
        self.serving.listeners.append(self._state_changed)

    async def close(self) -> None:
        for task in [*self._tasks, *([self._reaper] if self._reaper else [])]:
            task.cancel()
        await self._channels.close()
        self._batcher.close()

    def serve_span(self, engine: SpanEngine) -> None:
        """Serve `engine`'s span from now on, instead of the current one (a rebalance move, once drained)."""
        if self._sessions:
            raise InvalidInput(f"{len(self._sessions)} sessions are still open: a node changes its span only drained")
        self._batcher.close()
        self.engine = engine
        self._batcher = self._batcher_of(engine)
        if self._receipts is not None:
            self._receipts.manifest = engine.manifest

    def _batcher_of(self, engine: SpanEngine) -> StepBatcher:
        return StepBatcher(engine, max_steps=self.limits.max_batch_steps, gather_s=self.limits.batch_gather_s)

    @property
    def _token_bytes(self) -> int:
        """Bytes of one token's hidden state in the span served now: what a session's room is counted in."""
        return self.engine.hidden_size * self.engine.dtype.itemsize

    # -- Info -------------------------------------------------------------------------------

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.NodeInfo:
        try:
            self._authorize(context)
        except CoopError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return self.info()

    def info(self) -> pb.NodeInfo:
        """What the node serves, holds and has done: for `coop node status` and /metrics (on the event loop)."""
        limits = self.limits
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
                limited=dict(self._budgets.limited),
            ),
            reserved_cache_bytes=self.engine.reserved_bytes,
            used_cache_bytes=self.engine.used_cache_bytes,
            steps_in_flight=self._budgets.steps_in_flight,
            in_flight_bytes=self._budgets.bytes_in_flight,
            queued_steps=self._batcher.queued,
            open_channels=len(self._channels),
            state=self.serving.state,
            limits=pb.NodeInfo.Limits(
                cache_budget_bytes=self.engine.cache_budget_bytes,
                cache_bytes_per_peer=self._budgets.cache_bytes_per_peer,
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

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def _state_changed(self, state: str) -> None:
        """Leaving the serving state: ask the coordinator of every open session to move it elsewhere."""
        if self.serving.accepting:
            return
        deadline_s = self.serving.deadline_left_s()
        for live in self._sessions.values():
            draining = pb.SessionEvent.Draining(session_id=live.session_id, deadline_s=deadline_s)
            live.events.put_nowait(pb.SessionEvent(draining=draining))  # held by no budget: one small event

    # -- Session ----------------------------------------------------------------------------

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionControl], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SessionEvent]:
        self._unread_opens += 1
        try:
            opener = self._authorize(context)
            if opener is not None:
                opener.require(ROLE_COORDINATOR)
            first = await asyncio.wait_for(anext(request_iterator), OPEN_TIMEOUT_S)
            live = self._open(first, opener, context)
        except (CoopError, StopAsyncIteration, TimeoutError) as exc:
            error = exc if isinstance(exc, CoopError) else InvalidInput("the session stream must start with open")
            yield pb.SessionEvent(failed=pb.SessionEvent.Failed(step_id=0, error=error_to_proto(error)))
            return
        finally:
            self._unread_opens -= 1
            self._open_read.set()
            self._open_read = asyncio.Event()
        watcher = asyncio.create_task(self._watch_controls(request_iterator, live))
        try:
            if first.open.HasField("first_step"):
                self._launch_first_step(first.open.first_step, live)
            yield pb.SessionEvent(
                opened=pb.SessionEvent.Opened(session_id=live.session_id, cache_bytes=live.reserved_bytes)
            )
            while (event := await live.events.get()) is not None:
                try:
                    yield event
                finally:  # handed to gRPC (or the stream is gone): no longer ours to hold
                    self._budgets.give_bytes(live.peer, held_bytes(event))
        finally:
            watcher.cancel()
            self._free(live)
            self._budgets.give_session(live.peer)

    def _open(
        self, control: pb.SessionControl, opener: Identity | None, context: grpc.aio.ServicerContext
    ) -> LiveSession:
        """Open the session the first control message asks for, within the opener's budget.

        Everything is checked and taken with no await in between, so that streams opened side by
        side cannot all slip under a limit.
        """
        if control.WhichOneof("kind") != "open":
            raise InvalidInput("the session stream must start with open")
        request = control.open
        if opener is not None and request.node_id != self.node_id:
            raise Unauthorized(f"this is node {self.node_id!r}, not {request.node_id!r}: check the directory")
        if not _SESSION_ID.match(request.session_id):
            raise InvalidInput("session_id must be 1-128 characters of [A-Za-z0-9_.:-]")
        if not self.serving.accepting:
            raise NodeDraining(f"node {self.node_id} is {self.serving.state} and opens no new session: route around it")
        if request.session_id in self._sessions:
            raise InvalidInput(f"session {request.session_id} is already open on this node")
        if request.sketch_seed:
            check_dims(request.sketch_dims)
        if not self.engine.start <= request.start < request.end <= self.engine.end:
            raise SpanOutOfRange(
                f"this node serves blocks {self.engine.start}:{self.engine.end}, not {request.start}:{request.end}"
            )
        try:
            self.engine.check_max_length(request.max_length)
        except ContextLengthExceeded as exc:
            raise self._budgets.refuse("context_length", exc) from None
        peer = _peer_name(opener, context)
        reserved = self.engine.reservation_bytes(request.max_length, request.start, request.end)
        self._budgets.take_session(peer, reserved)
        try:
            self.engine.open_session(
                request.session_id, max_length=request.max_length, start=request.start, end=request.end
            )
        except BaseException as exc:
            self._budgets.give_cache(peer, reserved)
            self._budgets.give_session(peer)
            if isinstance(exc, CacheBudgetExceeded):
                raise self._budgets.refuse("cache_budget_bytes", exc) from None
            raise
        sketch = (request.sketch_seed, request.sketch_dims) if request.sketch_seed else None
        priority = request.priority if math.isfinite(request.priority) else 0.0
        coordinator = opener.institution if opener is not None else _peer_host(context)
        live = LiveSession(
            session_id=request.session_id,
            peer=peer,
            reserved_bytes=reserved,
            room_bytes=request.max_length * self._token_bytes,
            meter=SessionMeter(request.start, request.end, coordinator, min(max(priority, 0.0), 1.0)),
            opener=opener,
            sketch=sketch,
        )
        self._sessions[live.session_id] = live
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle())
        return live

    def _launch_first_step(self, step: pb.StepRequest, live: LiveSession) -> None:
        """Run the step that came with the open, as a Forward from the opener; a refusal becomes a
        `failed` event (after `opened`: the session is open either way)."""
        try:
            if step.session_id != live.session_id:
                raise InvalidInput(f"the first step is for session {step.session_id!r}, not the one it opens")
            self._launch(step, live.opener, live.peer)
        except CoopError as exc:
            failed = pb.SessionEvent.Failed(session_id=live.session_id, step_id=step.step_id, error=error_to_proto(exc))
            self._emit(live, pb.SessionEvent(failed=failed))

    def _free(self, live: LiveSession) -> None:
        """Free what the session holds, once: its cache, its unread events; and write its receipt."""
        if live.closed:
            return
        live.closed = True
        if self._sessions.get(live.session_id) is live:
            del self._sessions[live.session_id]
        self._budgets.give_cache(live.peer, live.reserved_bytes)
        self._budgets.give_bytes(live.peer, live.discard_events())
        self.engine.evict(live.session_id)
        self._write_receipt(live.session_id, live.meter)

    def _drop(self, live: LiveSession, setting: str, error: SessionDropped) -> None:
        """Close a session on the node's own initiative: free it now, and end its stream with why."""
        if live.closed:
            return
        log.info("closing session %s of %s: %s", live.session_id, live.peer, error)
        self._budgets.refuse(setting, error)
        self._free(live)
        failed = pb.SessionEvent.Failed(session_id=live.session_id, step_id=0, error=error_to_proto(error))
        live.events.put_nowait(pb.SessionEvent(failed=failed))  # held by no budget: one small event, once
        live.events.put_nowait(None)

    def _emit(self, live: LiveSession, event: pb.SessionEvent) -> None:
        """Queue an event for the session's coordinator, or close the session if it leaves too many unread."""
        if live.closed:
            return
        unread = live.events.qsize()
        if unread >= self.limits.max_events_per_session:
            setting, why = "max_events_per_session", f"{unread} events"
        elif not self._budgets.take_result(live.peer, held_bytes(event)):
            setting, why = (
                "max_in_flight_bytes_per_peer",
                f"more than {self.limits.max_in_flight_bytes_per_peer:,} bytes",
            )
        else:
            live.events.put_nowait(event)
            return
        message = (
            f"the coordinator of session {live.session_id} left {why} unread, the limit; the node closed the session"
        )
        self._drop(live, setting, SessionDropped(message))

    async def _reap_idle(self) -> None:
        """Close the sessions that had no step for idle_timeout_s, so an idle stream cannot pin cache."""
        timeout_s = self.limits.idle_timeout_s
        while True:
            await asyncio.sleep(min(timeout_s / 4, MAX_REAP_INTERVAL_S))
            deadline = time.monotonic() - timeout_s
            for live in [s for s in self._sessions.values() if s.idle_since(deadline)]:
                error = SessionDropped(
                    f"session {live.session_id} had no step for {timeout_s:g} s; the node closed it and freed its "
                    f"{live.reserved_bytes:,} bytes of KV cache"
                )
                self._drop(live, "idle_timeout_s", error)

    def _write_receipt(self, session_id: str, meter: SessionMeter) -> None:
        """The session's last batch."""
        if self._receipts is None:
            return
        try:
            self._receipts.ended(session_id, meter)
        except Exception:  # the session is over either way; losing one receipt must not crash the node
            log.exception("could not write the receipt of session %s", session_id)

    def _meter_step(self, live: LiveSession, tokens: int) -> None:
        """Count a step; a batch it fills is written to the outbox at once."""
        if self._receipts is None:
            return
        try:
            self._receipts.stepped(live.session_id, live.meter, tokens)
        except Exception:  # the batch stays open and is written with the next step or at the end
            log.exception("could not write a receipt of session %s", live.session_id)

    async def _watch_controls(self, request_iterator: AsyncIterator[pb.SessionControl], live: LiveSession) -> None:
        """End the session on Close, on the end of the stream, or when the coordinator vanishes."""
        try:
            async for control in request_iterator:
                if control.WhichOneof("kind") == "close":
                    break
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            if not live.closed:  # a dropped session's stream already ends after its failure
                live.events.put_nowait(None)

    # -- Forward ----------------------------------------------------------------------------

    async def Forward(self, request: pb.StepRequest, context: grpc.aio.ServicerContext) -> pb.StepAck:
        try:
            caller = self._authorize(context)
            await self._await_open(request.session_id)
            self._launch(request, caller, _peer_name(caller, context))
        except CoopError as exc:
            return pb.StepAck(error=error_to_proto(exc))
        return pb.StepAck()

    async def _await_open(self, session_id: str) -> None:
        """Wait, at most OPEN_GRACE_S, while the session is unknown and some stream's open is unread.

        The coordinator opens every hop of a route at once and sends the first step with the first
        hop's open, so the previous hop's push can arrive here before this hop's open is read (a
        stream's first message is one event-loop turn behind a unary call's). Without unread opens,
        an unknown session is refused at once, as ever."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OPEN_GRACE_S
        while session_id not in self._sessions and self._unread_opens and (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._open_read.wait(), left)

    def _launch(self, request: pb.StepRequest, caller: Identity | None, peer: str) -> None:
        """Accept a step (CoopError if refused) and run it in the background."""
        live, hidden, next_hops = self._accept(request, caller, peer)
        task = asyncio.create_task(self._run_step(request, hidden, next_hops, live, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _accept(
        self, request: pb.StepRequest, caller: Identity | None, peer: str
    ) -> tuple[LiveSession, torch.Tensor, list[pb.Hop]]:
        """Check a step and take its place in the budgets (before its tensor is decoded)."""
        live = self._sessions.get(request.session_id)
        if live is None:
            raise UnknownSession(f"no session {request.session_id} is open on node {self.node_id}")
        next_hops = self._route_after_me(request, caller, live)
        step_bytes = len(request.hidden.data)
        # A rewind gives back the room of the dropped tokens (rejected drafts of a multi-token step).
        kept_bytes = live.bytes_run
        if request.rewind:
            kept_bytes = max(0, min(live.bytes_run, request.start_position * self._token_bytes))
        room_left_bytes = live.room_left_bytes + live.bytes_run - kept_bytes
        if step_bytes > room_left_bytes:
            raise self._budgets.refuse(
                "max_length",
                SessionLimitExceeded(
                    f"a step of {step_bytes:,} bytes does not fit session {request.session_id}: its max_length "
                    f"leaves room for {max(room_left_bytes, 0):,} more bytes of hidden states "
                    f"({max(room_left_bytes, 0) // self._token_bytes} tokens)"
                ),
            )
        if live.steps_in_flight >= self.limits.max_steps_in_flight_per_session:
            raise self._budgets.refuse(
                "max_steps_in_flight_per_session",
                InFlightLimitExceeded(
                    f"session {request.session_id} already has {live.steps_in_flight} steps in flight, the limit"
                ),
            )
        self._budgets.take_step(peer, step_bytes)
        try:
            hidden = tensor_from_proto(
                request.hidden,
                expected_dtype=self.engine.dtype,
                expected_shape=(1, None, self.engine.hidden_size),
                name="hidden states",
            )
        except BaseException:
            self._budgets.give_step(peer, step_bytes)
            raise
        live.steps_in_flight += 1
        live.bytes_run = kept_bytes
        live.bytes_to_run += step_bytes
        live.last_active = time.monotonic()
        return live, hidden, next_hops

    def _route_after_me(self, request: pb.StepRequest, caller: Identity | None, live: LiveSession) -> list[pb.Hop]:
        """The hops after this one on the step's route, once the route and the caller check out.

        In a pool the route must carry the signature of the coordinator that opened the session, and
        the caller must be this node's predecessor on it: that coordinator for the first hop, the
        previous node otherwise. (Verified routes are kept per session: the signature is checked once
        per route, not once per step.)
        """
        session_id = request.session_id
        known = live.route
        if known is not None and known[:2] == (request.route, request.route_signature):
            hops = known[2]
        else:
            hops = decode_route(request.route, session_id)
            if live.opener is not None:
                try:
                    verify_signature(live.opener.certificate, route_payload(request.route), request.route_signature)
                except Unauthorized as exc:
                    raise Unauthorized(f"the route of session {session_id} is not signed by its coordinator") from exc
                live.route = (request.route, request.route_signature, hops)
        mine = [i for i, hop in enumerate(hops) if (hop.node_id, hop.institution) == (self.node_id, self.institution)]
        if len(mine) != 1:
            raise InvalidInput(f"node {self.node_id} is not on the route of session {session_id}")
        index = mine[0]
        if len(request.sketches) > index:
            raise InvalidInput(
                f"a step for hop {index} carries {len(request.sketches)} sketches, more than hops before it"
            )
        meter = live.meter
        if (hops[index].start, hops[index].end) != (meter.start, meter.end):
            raise SpanOutOfRange(
                f"the route gives this node blocks {hops[index].start}:{hops[index].end}, "
                f"the session was opened for {meter.start}:{meter.end}"
            )
        if caller is not None:
            self._check_predecessor(live, caller, None if index == 0 else hops[index - 1])
        return hops[index + 1 :]

    def _check_predecessor(self, live: LiveSession, caller: Identity, previous: pb.Hop | None) -> None:
        if previous is None:
            if live.opener is None or caller.certificate != live.opener.certificate:
                raise Unauthorized(f"only the coordinator of session {live.session_id} may send it its first step")
        elif (caller.role, caller.institution, caller.node_id) != (ROLE_NODE, previous.institution, previous.node_id):
            raise Unauthorized(
                f"{caller.describe()} is not the node before this one on the route of session {live.session_id}"
            )

    async def _run_step(
        self,
        request: pb.StepRequest,
        hidden: torch.Tensor,
        next_hops: list[pb.Hop],
        live: LiveSession,
        peer: str,
    ) -> None:
        session_id, step_id = request.session_id, request.step_id
        step_bytes = len(request.hidden.data)
        event: pb.SessionEvent | None = None  # for the coordinator, once the step's own bytes are given back
        ran = False
        accepted = time.monotonic()
        try:
            output = await self._batcher.step(
                session_id, hidden, request.start_position, priority=live.meter.priority, rewind=request.rewind
            )
            self._step_seconds(time.monotonic() - accepted)
            self._meter_step(live, hidden.shape[1])
            live.bytes_run += step_bytes
            live.bytes_to_run -= step_bytes
            ran = True
            self.counters.steps_run += 1
            message = tensor_to_proto(output)
            sketches = list(request.sketches)
            if live.sketch is not None:
                sketches.append(sketch_to_proto(self.node_id, hidden, output, *live.sketch))
            if next_hops:
                await self._push(next_hops, request, message, sketches)
                self.counters.pushes_sent += 1
            else:
                result = pb.SessionEvent.Result(
                    session_id=session_id, step_id=step_id, hidden=message, sketches=sketches
                )
                event = pb.SessionEvent(result=result)
                self.counters.results_sent += 1
        except Exception as exc:
            if not isinstance(exc, CoopError):
                log.exception("step %s of session %s failed", step_id, session_id)
            failed = pb.SessionEvent.Failed(session_id=session_id, step_id=step_id, error=error_to_proto(exc))
            event = pb.SessionEvent(failed=failed)
        finally:
            self._budgets.give_step(peer, step_bytes)
            live.steps_in_flight -= 1
            if not ran:
                live.bytes_to_run -= step_bytes
            live.last_active = time.monotonic()
        if event is not None:
            self._emit(live, event)

    async def _push(
        self, next_hops: list[pb.Hop], step: pb.StepRequest, hidden: pb.Tensor, sketches: list[pb.Sketch]
    ) -> None:
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
            rewind=step.rewind,
            sketches=sketches,
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


def _peer_name(caller: Identity | None, context: grpc.aio.ServicerContext) -> str:
    """Whose budget a call counts against: the caller's certificate, or its address in development."""
    return caller.describe() if caller is not None else _peer_host(context)
