"""A step on this node: accepted within its session's room and its caller's budget, run in the
batcher, then pushed to the next hop, or, on the last hop, sent to the coordinator as a `result` event.

Anything that goes wrong after a step is accepted becomes a `failed` event on its session's stream,
so one session's trouble never reaches another session.

Rewinds run only as the coordinator asked. A rewinding step may drop only tokens of the session's
latest step here, keeping that step's first token (never a token of an earlier step), its step id
must be newer, and in a pool it must carry the coordinator's signature over exactly that rewind
(coop/wire/routes.py), which asks only to drop rejected drafts, never below the prompt. Anything else is
refused before anything runs, so a hop that keeps rewinding its successor gets refusals, not
recomputed work: the node computes, and bills, only what the coordinator sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from coop.errors import (
    CoopError,
    InFlightLimitExceeded,
    InvalidInput,
    InvalidPositions,
    PeerError,
    SessionLimitExceeded,
    Unauthorized,
)
from coop.model.engine import SpanEngine
from coop.node.batching import StepBatcher
from coop.node.limits import NodeLimits, PeerBudgets
from coop.node.route_checks import RouteChecks
from coop.node.session_receipts import SessionReceipts
from coop.node.session_streams import SessionStreams
from coop.node.sessions import LiveSession, token_bytes
from coop.pool.ca import verify_signature
from coop.pool.identity import Identity
from coop.wire.channels import ChannelPool, ChannelSecurity
from coop.wire.errors import error_from_proto, error_to_proto
from coop.wire.generated import coop_pb2 as pb
from coop.wire.routes import rewind_payload
from coop.wire.sketches import sketch_to_proto
from coop.wire.tensors import tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 30.0


@dataclass
class Counters:
    steps_run: int = 0
    pushes_sent: int = 0
    results_sent: int = 0


class StepRunner:
    def __init__(
        self,
        engine: SpanEngine,
        *,
        node_id: str,
        limits: NodeLimits,
        budgets: PeerBudgets,
        streams: SessionStreams,
        routes: RouteChecks,
        receipts: SessionReceipts,
        security: ChannelSecurity | None,
        step_seconds: Callable[[float], None],
    ) -> None:
        """`security`: how to reach the next hop. `step_seconds`: told how long each step took from
        its acceptance to its output (the node's latency histogram)."""
        self.engine = engine
        self.node_id = node_id
        self.limits = limits
        self.counters = Counters()
        self._budgets = budgets
        self._streams = streams
        self._routes = routes
        self._receipts = receipts
        self._step_seconds = step_seconds
        self._batcher = self._batcher_of(engine)
        self._channels = ChannelPool(security, max_channels=limits.max_channels)
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self._channels.close()
        self._batcher.close()

    def serve(self, engine: SpanEngine) -> None:
        """Run the steps of `engine`'s span from now on (a rebalance move, once drained)."""
        self._batcher.close()
        self.engine = engine
        self._batcher = self._batcher_of(engine)

    def _batcher_of(self, engine: SpanEngine) -> StepBatcher:
        return StepBatcher(engine, max_steps=self.limits.max_batch_steps, gather_s=self.limits.batch_gather_s)

    @property
    def queued_steps(self) -> int:
        return self._batcher.queued

    @property
    def open_channels(self) -> int:
        return len(self._channels)

    def launch(self, request: pb.StepRequest, caller: Identity | None, peer: str) -> None:
        """Accept a step (CoopError if refused) and run it in the background."""
        live, hidden, next_hops = self._accept(request, caller, peer)
        task = asyncio.create_task(self._run(request, hidden, next_hops, live, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def launch_first(self, step: pb.StepRequest, live: LiveSession) -> None:
        """Run the step that came with the open, as a Forward from the opener; a refusal becomes a
        `failed` event (after `opened`: the session is open either way)."""
        try:
            if step.session_id != live.session_id:
                raise InvalidInput(f"the first step is for session {step.session_id!r}, not the one it opens")
            self.launch(step, live.opener, live.peer)
        except CoopError as exc:
            failed = pb.SessionEvent.Failed(session_id=live.session_id, step_id=step.step_id, error=error_to_proto(exc))
            self._streams.emit(live, pb.SessionEvent(failed=failed))

    def _accept(
        self, request: pb.StepRequest, caller: Identity | None, peer: str
    ) -> tuple[LiveSession, torch.Tensor, list[pb.Hop]]:
        """Check a step and take its place in the budgets (before its tensor is decoded)."""
        live = self._streams.find(request.session_id)
        next_hops = self._routes.hops_after(request, caller, live)
        step_bytes = len(request.hidden.data)
        per_token = token_bytes(self.engine)
        tokens = step_bytes // per_token
        if request.rewind:
            self._check_rewind(request, live, tokens)
        # A rewind gives back the room of the dropped tokens (rejected drafts of a multi-token step).
        kept_bytes = live.bytes_run
        if request.rewind:
            kept_bytes = max(0, min(live.bytes_run, request.start_position * per_token))
        room_left_bytes = live.room_left_bytes + live.bytes_run - kept_bytes
        if step_bytes > room_left_bytes:
            raise self._budgets.refuse(
                "max_length",
                SessionLimitExceeded(
                    f"a step of {step_bytes:,} bytes does not fit session {request.session_id}: its max_length "
                    f"leaves room for {max(room_left_bytes, 0):,} more bytes of hidden states "
                    f"({max(room_left_bytes, 0) // per_token} tokens)"
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
        live.latest_step = (request.step_id, request.start_position, tokens)
        live.bytes_run = kept_bytes
        live.bytes_to_run += step_bytes
        live.last_active = time.monotonic()
        return live, hidden, next_hops

    def _check_rewind(self, request: pb.StepRequest, live: LiveSession, tokens: int) -> None:
        """Refuse a rewind the coordinator did not ask for, or one beyond the latest step's drafts."""
        latest = live.latest_step
        if latest is None or not (latest[0] < request.step_id and latest[1] < request.start_position):
            raise self._budgets.refuse(
                "rewind",
                InvalidPositions(
                    f"step {request.step_id} of session {live.session_id} rewinds to position "
                    f"{request.start_position}: a step may drop only the draft tokens of the latest step before it"
                ),
            )
        if live.opener is None:
            return
        payload = rewind_payload(live.session_id, request.step_id, request.start_position, tokens)
        try:
            verify_signature(live.opener.certificate, payload, request.rewind_signature)
        except Unauthorized as exc:
            raise self._budgets.refuse(
                "rewind",
                Unauthorized(
                    f"step {request.step_id} of session {live.session_id} rewinds without its coordinator's signature"
                ),
            ) from exc

    async def _run(
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
                session_id, hidden, request.start_position, priority=live.priority, rewind=request.rewind
            )
            self._step_seconds(time.monotonic() - accepted)
            self._receipts.stepped(live, hidden.shape[1])
            live.bytes_run += step_bytes
            live.bytes_to_run -= step_bytes
            ran = True
            self.counters.steps_run += 1
            message = tensor_to_proto(output)
            sketches = list(request.sketches)
            if live.sketch is not None:
                sketches.append(sketch_to_proto(self.node_id, request.hidden, message, *live.sketch))
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
            self._streams.emit(live, event)

    async def _push(
        self, next_hops: list[pb.Hop], step: pb.StepRequest, hidden: pb.Tensor, sketches: list[pb.Sketch]
    ) -> None:
        target = next_hops[0]
        request = pb.StepRequest(
            session_id=step.session_id,
            step_id=step.step_id,
            hidden=hidden,
            start_position=step.start_position,
            route=step.route,
            route_signature=step.route_signature,
            rewind=step.rewind,
            rewind_signature=step.rewind_signature,
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
