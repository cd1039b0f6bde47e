"""The node's open sessions, each a stream of events to the coordinator that opened it.

A session opens with the stream's first message, within its coordinator's budgets and its consuming
institution's share of the KV cache (coop/node/cache_shares.py: an open below its share closes idle
sessions of institutions above theirs), and closes when the coordinator closes or leaves the stream.
The node closes a session itself when it is idle past `idle_timeout_s`, when its coordinator lets its
events pile up, or to give its room to an institution below its share; its cache is freed at once.
(Its stream ends once the coordinator reads to the failure at its end; until then it counts as one
of that coordinator's sessions, so unread streams stay bounded too.) When the node stops serving
(coop/node/drain.py), every open stream is told so, so its coordinator can move the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc

from coop.errors import (
    CacheBudgetExceeded,
    ContextLengthExceeded,
    CoopError,
    InvalidInput,
    NodeDraining,
    PeerCacheLimitExceeded,
    SessionDropped,
    SpanOutOfRange,
    Unauthorized,
    UnknownSession,
)
from coop.model.engine import SpanEngine
from coop.node.cache_shares import Holding, held_by_consumer, plan_room
from coop.node.drain import ServingState
from coop.node.limits import NodeLimits, PeerBudgets
from coop.node.receipt_batches import SessionMeter
from coop.node.session_receipts import SessionReceipts
from coop.node.sessions import LiveSession, held_bytes, peer_name, token_bytes
from coop.pool.ca import ROLE_COORDINATOR
from coop.pool.identity import Identity
from coop.wire.errors import error_to_proto
from coop.wire.generated import coop_pb2 as pb
from coop.wire.sketches import check_dims

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 10.0
OPEN_GRACE_S = 1.0  # the longest a step for an unknown session waits for unread opens (see `await_open`)
MAX_REAP_INTERVAL_S = 5.0
_SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

FirstStep = Callable[[pb.StepRequest, LiveSession], None]  # runs the step that comes with an open


class SessionStreams:
    def __init__(
        self,
        engine: SpanEngine,
        *,
        node_id: str,
        limits: NodeLimits,
        budgets: PeerBudgets,
        serving: ServingState,
        receipts: SessionReceipts,
    ) -> None:
        self.engine = engine  # replaced on a rebalance move, once no session is open
        self.node_id = node_id
        self.limits = limits
        self.serving = serving
        self._budgets = budgets
        self._receipts = receipts
        self._sessions: dict[str, LiveSession] = {}
        self._unread_opens = 0  # session streams whose first message is not read yet
        self._open_read = asyncio.Event()  # set (and replaced) each time one is read
        self._reaper: asyncio.Task[None] | None = None
        serving.listeners.append(self._state_changed)

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()

    @property
    def count(self) -> int:
        return len(self._sessions)

    def find(self, session_id: str) -> LiveSession:
        live = self._sessions.get(session_id)
        if live is None:
            raise UnknownSession(f"no session {session_id} is open on node {self.node_id}")
        return live

    async def serve(
        self,
        controls: AsyncIterator[pb.SessionControl],
        authorize: Callable[[], Identity | None],
        host: str,
        first_step: FirstStep,
    ) -> AsyncGenerator[pb.SessionEvent, None]:
        """One session's stream: open it from the first control, then hand its events out until it ends.

        `authorize` names the opener (None in development mode, where `host`, its address, stands for it)."""
        self._unread_opens += 1
        try:
            opener = authorize()
            if opener is not None:
                opener.require(ROLE_COORDINATOR)
            first = await asyncio.wait_for(anext(controls), OPEN_TIMEOUT_S)
            live = self._open(first, opener, host)
        except (CoopError, StopAsyncIteration, TimeoutError) as exc:
            error = exc if isinstance(exc, CoopError) else InvalidInput("the session stream must start with open")
            yield pb.SessionEvent(failed=pb.SessionEvent.Failed(step_id=0, error=error_to_proto(error)))
            return
        finally:
            self._unread_opens -= 1
            self._open_read.set()
            self._open_read = asyncio.Event()
        watcher = asyncio.create_task(self._watch_controls(controls, live))
        try:
            if first.open.HasField("first_step"):
                first_step(first.open.first_step, live)
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

    def _open(self, control: pb.SessionControl, opener: Identity | None, host: str) -> LiveSession:
        """Open the session the first control message asks for, within the opener's budget.

        Everything is checked and taken with no await in between, so that streams opened side by
        side cannot all slip under a limit.
        """
        if control.WhichOneof("kind") != "open":
            raise InvalidInput("the session stream must start with open")
        request = control.open
        self._check_open(request, opener)
        peer = peer_name(opener, host)
        consumer = request.consumer or (opener.institution if opener is not None else host)
        reserved = self.engine.reservation_bytes(request.max_length, request.start, request.end)
        self._budgets.take_session(peer)
        try:
            self._make_room(consumer, reserved)
            self.engine.open_session(
                request.session_id, max_length=request.max_length, start=request.start, end=request.end
            )
        except BaseException as exc:
            self._budgets.give_session(peer)
            if isinstance(exc, CacheBudgetExceeded) and not isinstance(exc, PeerCacheLimitExceeded):
                raise self._budgets.refuse("cache_budget_bytes", exc) from None
            raise
        priority = request.priority if math.isfinite(request.priority) else 0.0
        live = LiveSession(
            session_id=request.session_id,
            peer=peer,
            consumer=consumer,
            start=request.start,
            end=request.end,
            priority=min(max(priority, 0.0), 1.0),
            reserved_bytes=reserved,
            room_bytes=request.max_length * token_bytes(self.engine),
            meter=SessionMeter(opener.institution if opener is not None else host),
            opener=opener,
            sketch=(request.sketch_seed, request.sketch_dims) if request.sketch_seed else None,
        )
        self._sessions[live.session_id] = live
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle())
        return live

    def _make_room(self, consumer: str, need_bytes: int) -> None:
        """Make room for `consumer`'s new session of `need_bytes`, closing idle sessions of institutions
        above their share if it is below its own; a capacity error if it cannot have the room."""
        holdings = [
            Holding(s.session_id, s.consumer, s.reserved_bytes, None if s.steps_in_flight else s.last_active)
            for s in self._sessions.values()
        ]
        budget, free = self.engine.cache_budget_bytes, self.engine.free_cache_bytes
        plan = plan_room(budget, free, consumer, need_bytes, holdings)
        if plan.refused and plan.over_share:
            held = held_by_consumer(holdings).get(consumer, 0)
            raise self._budgets.refuse(
                "cache_share", PeerCacheLimitExceeded(consumer, need_bytes, held, plan.share_bytes)
            )
        if plan.refused:
            raise CacheBudgetExceeded(need_bytes, free, budget)
        for session_id in plan.evict:
            live = self._sessions[session_id]
            error = SessionDropped(
                f"session {session_id} of {live.consumer} was idle while {consumer}, below its fair share of "
                f"this node's KV cache, needed room; the node closed it and freed its {live.reserved_bytes:,} bytes"
            )
            self._drop(live, "cache_share", error)

    def _check_open(self, request: pb.SessionControl.Open, opener: Identity | None) -> None:
        """Refuse an open this node cannot take, before anything is reserved for it."""
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

    def _free(self, live: LiveSession) -> None:
        """Free what the session holds, once: its cache, its unread events; and write its receipt."""
        if live.closed:
            return
        live.closed = True
        if self._sessions.get(live.session_id) is live:
            del self._sessions[live.session_id]
        self._budgets.give_bytes(live.peer, live.discard_events())
        self.engine.evict(live.session_id)
        self._receipts.ended(live)

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

    def emit(self, live: LiveSession, event: pb.SessionEvent) -> None:
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

    async def _watch_controls(self, controls: AsyncIterator[pb.SessionControl], live: LiveSession) -> None:
        """End the session on Close, on the end of the stream, or when the coordinator vanishes."""
        try:
            async for control in controls:
                if control.WhichOneof("kind") == "close":
                    break
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            if not live.closed:  # a dropped session's stream already ends after its failure
                live.events.put_nowait(None)

    async def await_open(self, session_id: str) -> None:
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

    def _state_changed(self, state: str) -> None:
        """Leaving the serving state: ask the coordinator of every open session to move it elsewhere."""
        if self.serving.accepting:
            return
        deadline_s = self.serving.deadline_left_s()
        for live in self._sessions.values():
            draining = pb.SessionEvent.Draining(session_id=live.session_id, deadline_s=deadline_s)
            live.events.put_nowait(pb.SessionEvent(draining=draining))  # held by no budget: one small event
