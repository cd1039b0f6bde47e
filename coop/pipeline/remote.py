"""A chain of remote nodes for one session: open streams, push steps, fail over.

The coordinator sends each step to the first hop only, with the route attached and, in a pool,
signed (`coop.wire.routes`): each node takes steps only from its predecessor on it and pushes
only to its successor. The last hop returns the output on its session stream. If a hop dies (its
stream breaks, a call to it fails, or the step times out and the hop does not answer a probe), the chain picks a new
route without it, replays the session's tokens through it to rebuild every cache, and carries on:
the caller sees a pause, and greedy decoding gives the same tokens. (After multi-token steps only
the tokens the caller kept are replayed: `start_position` of the step that failed.)

Who is at fault is decided in `coop.pipeline.route_failures`: what a node reports of another is a
claim, not proof, and a capacity refusal is no failure. Refusals are routed around as long as
routes remain, without using up failovers; only failures count against `max_failovers`. A spot
check's conviction takes the culprit's institution out of the session's routes, and uses up no
failover either (`route_around`).

A hop that is leaving (draining or paused: it says so on its session stream, or its announcement
does) is moved off the same way, as a planned move: at the next step boundary the chain opens a
route without it, closes the old one and replays, with no error, no failover counted and nobody
suspected. If no other route serves the blocks yet, the session stays and the chain looks again
every `MOVE_RETRY_S` (the node keeps serving it up to its drain deadline).

What a node reports, or sends that fails validation, is the node's fault, never the caller's: it
leaves the chain as a `PeerError` whose `remote_type` names the node's error (a node's
`InvalidTensor` must not become the HTTP client's 400).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from coop.config import CoordinatorSettings
from coop.errors import CoopError, InvalidTensor, PeerError, RouteUnavailable, UnknownSession
from coop.pipeline.charge import UNMETERED, Charge
from coop.pipeline.hop_streams import Events, HopStream, open_hop_stream, unanswering
from coop.pipeline.route_failures import HopsFailed, SessionAvoidance, is_capacity_refusal
from coop.receipts import TokenTally
from coop.swarm.node_key import NodeKey
from coop.swarm.routing import Hop
from coop.wire.channels import ChannelPool
from coop.wire.errors import error_from_proto
from coop.wire.generated import coop_pb2 as pb
from coop.wire.routes import encode_route, rewind_payload, route_payload
from coop.wire.tensors import tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)

MOVE_RETRY_S = 2.0  # how often a session on a leaving node looks for another route when none was found
MAX_QUEUED_EVENTS: int = CoordinatorSettings.model_fields["max_queued_events_per_session"].default


@dataclass(frozen=True)
class SentStep:
    """The last step as the route ran it (after a failover: with the replayed prefix), and the
    sketches its hops returned with the result (coop/wire/sketches.py), for spot checks."""

    session_id: str
    hidden: torch.Tensor  # (1, n, hidden_size), what the first hop received
    start_position: int
    output: torch.Tensor  # (1, n, hidden_size), what the last hop returned
    sketches: list[pb.Sketch]


class RouteSource(Protocol):
    """What a `RemoteChain` needs of the swarm: a `SwarmView`, or a spot check's replica route chosen in advance."""

    revoked: Callable[[], frozenset[str]]

    async def route(self, exclude: Collection[NodeKey] = (), avoid_institutions: Collection[str] = ()) -> list[Hop]: ...
    def leaving(self) -> set[NodeKey]: ...
    def release(self, hops: Sequence[Hop]) -> None: ...
    def suspect(self, key: NodeKey) -> None: ...
    def refused(self, key: NodeKey) -> None: ...
    def served(self, hops: Sequence[Hop]) -> None: ...
    def step_completed(self, hops: Sequence[Hop], tokens: int, seconds: float) -> None: ...


class RemoteChain:
    """Implements `coop.pipeline.generation.Chain` over gRPC."""

    def __init__(
        self,
        swarm: RouteSource,
        channels: ChannelPool,
        embed: Callable[[torch.Tensor], torch.Tensor],
        *,
        hidden_size: int,
        dtype: torch.dtype,
        max_length: int,
        step_timeout_s: float = 30.0,
        max_failovers: int = 3,
        charge: Charge = UNMETERED,
        sign_route: Callable[[bytes], bytes] | None = None,
        max_queued_events: int = MAX_QUEUED_EVENTS,
        draft_tokens: int = 0,
        sketch_dims: int = 0,
    ) -> None:
        """`charge`: who pays, the fair-share priority nodes order queued steps by, and the meter
        that writes down what each node did. `sign_route`: the coordinator's signature over a
        route (None in development mode, where nodes check nothing). `max_queued_events`: events
        the route's session streams may queue here; when full, they are not read (gRPC's flow
        control then holds the nodes back), so a node streaming junk cannot grow our memory.
        `draft_tokens`: see `coop.pipeline.generation.Chain`."""
        self.swarm = swarm
        self.channels = channels
        self.embed = embed
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.max_length = max_length
        self.step_timeout_s = step_timeout_s
        self.max_failovers = max_failovers
        self.session_id = ""
        self.hops: list[Hop] = []
        self.failovers = 0
        self.moves = 0  # planned moves off leaving nodes (not failures)
        self._leaving: set[int] = set()  # hops of the current route that said they are leaving
        self._next_move_s = 0.0
        self.draft_tokens = draft_tokens
        self._stepped = 0  # positions the current route's caches hold, rejected drafts included
        self._streams: list[HopStream] = []
        self._max_queued_events = max_queued_events
        self._events: Events = asyncio.Queue(max_queued_events)
        self._step_id = 0
        self._avoidance = SessionAvoidance()
        self.charge = charge
        self._sent = TokenTally()  # sent to the current route, which every hop of it computes
        self._sign_route = sign_route
        self._route = b""
        self._route_signature = b""
        self._reserved: list[Hop] = []  # the route the swarm view counts as our load until released
        self.sketch_dims = sketch_dims
        self.sketch_seed = 0
        self.last_step: SentStep | None = None
        self._replay = False  # the caller moved the session to a new route: the next step replays

    async def open(self) -> RemoteChain:
        """Choose the route. Its sessions open with the first step, which rides the first hop's open:
        one round trip less before the first token."""
        self._use_route(await self._best_route())
        return self

    async def _best_route(self) -> list[Hop]:
        avoid = self._avoidance
        return await self.swarm.route(avoid.excluded | avoid.refusing, avoid.left_institutions)

    async def _reopen(self, failure: HopsFailed, *, failovers: bool) -> None:
        """Leave the route for `failure`, and open the session on the best route without what it avoids.

        Refusals cost nothing: each leaves the session a node it had not tried (and refusing
        institutions leave it whole), so they end when the nodes do, and RouteUnavailable says so.
        Opens that fail count: as failovers if `failovers`, else up to max_failovers of them (a
        session's first open: nothing ran, so no failover is counted).
        """
        failed_opens = 0
        while True:
            counts = self._avoidance.counts(failure)
            if counts and failovers:
                if self.failovers >= self.max_failovers:
                    raise PeerError(f"giving up after {self.failovers} failovers: {failure}") from failure
                self.failovers += 1
            elif counts:
                failed_opens += 1
                if failed_opens > self.max_failovers:
                    await self._abandon(failure)
                    raise PeerError(f"could not open a session on any route after {failed_opens} attempts") from failure
            await self._abandon(failure)
            try:
                await self._open_route()
                return
            except HopsFailed as exc:
                failure = exc

    async def _open_route(self, hops: list[Hop] | None = None) -> None:
        """Open the session on `hops`, or on the best route the swarm view has now."""
        self._use_route(hops if hops is not None else await self._best_route())
        await self._open_streams()

    def _use_route(self, hops: list[Hop]) -> None:
        """Make `hops` the session's route (a new session id); its streams are not open yet."""
        self.hops = self._reserved = hops
        self._leaving = set()
        self.session_id = uuid.uuid4().hex
        self.sketch_seed = secrets.randbits(63) | 1 if self.sketch_dims else 0
        self._route = encode_route(self.session_id, self.hops)
        self._route_signature = b"" if self._sign_route is None else self._sign_route(route_payload(self._route))
        self._sent = TokenTally()
        self._stepped = 0
        self._events = asyncio.Queue(self._max_queued_events)

    async def _open_streams(self, first_step: pb.StepRequest | None = None) -> None:
        """Open the session on every hop of the route at once, `first_step` with the first hop's open.

        The last hops' opens are started first, so they usually reach their nodes before the first
        step's push does (a node also waits for opens it has not read yet). Each stream joins
        self._streams as soon as it is open, so close() finds it even if this is cancelled half-way.
        """
        last_first = [
            self._open_stream(i, hop, self._events, first_step if i == 0 else None)
            for i, hop in reversed(list(enumerate(self.hops)))
        ]
        opened = (await asyncio.gather(*last_first, return_exceptions=True))[::-1]
        self.swarm.served([hop for hop, s in zip(self.hops, opened, strict=True) if isinstance(s, HopStream)])
        failed = {hop.key: s for hop, s in zip(self.hops, opened, strict=True) if not isinstance(s, HopStream)}
        if failed:
            errors = "; ".join(str(s) for s in failed.values())
            # a refusing node (draining, paused, full) is alive and well: route around it, suspect nobody
            refused = {key for key, s in failed.items() if is_capacity_refusal(s.__cause__)}
            raise HopsFailed(f"could not open the session: {errors}", dead=failed.keys() - refused, refused=refused)

    async def _open_stream(
        self,
        index: int,
        hop: Hop,
        events: Events,
        first_step: pb.StepRequest | None,
    ) -> HopStream:
        open_msg = pb.SessionControl.Open(
            session_id=self.session_id,
            max_length=self.max_length,
            start=hop.start,
            end=hop.end,
            priority=self.charge.priority,
            node_id=hop.node_id,
            sketch_seed=self.sketch_seed,
            sketch_dims=self.sketch_dims,
            first_step=first_step,
            consumer=self.charge.consumer.institution,
        )
        stream = await open_hop_stream(self.channels, hop, open_msg, index, events, self._leaving)
        self._streams.append(stream)
        return stream

    async def step(self, hidden: torch.Tensor, start_position: int, token_ids: Sequence[int]) -> torch.Tensor:
        # after a failover, a move or a spot check's reroute the new route's caches are empty: replay first
        fresh_route, self._replay = self._replay, False
        while True:
            try:
                fresh_route = await self._move_if_leaving() or fresh_route
                if fresh_route and start_position > 0:
                    # Rebuild every cache on the new route from the session's tokens so far.
                    prefix = self.embed(torch.tensor([list(token_ids[:start_position])]))
                    full = torch.cat([prefix.to(hidden.dtype), hidden], dim=1)
                    return (await self._step_once(full, 0))[:, -hidden.shape[1] :]
                return await self._step_once(hidden, start_position)
            except HopsFailed as exc:
                await self._fail_over(exc)
                fresh_route = True

    async def route_around(self, nodes: Collection[NodeKey], reason: str, *, convicted: bool) -> None:
        """Leave the route for one without its hops among `nodes`, which a spot check found at fault: proven
        (`convicted`: their institutions leave the session, and no failover is counted) or disputed. The
        next step replays the session's tokens on the new route."""
        on_route = {h.key for h in self.hops} & set(nodes)
        failure = HopsFailed(reason, convicted=on_route) if convicted else HopsFailed(reason, avoid=on_route)
        await self._fail_over(failure)
        self._replay = True

    async def _move_if_leaving(self) -> bool:
        """Move the session off hops that are leaving, if another route serves it; whether it moved."""
        on_route = {hop.key for hop in self.hops}
        leaving = {self.hops[i].key for i in self._leaving} | (self.swarm.leaving() & on_route)
        now = asyncio.get_running_loop().time()
        if not leaving or now < self._next_move_s:
            return False
        try:
            hops = await self.swarm.route(self._avoidance.excluded | leaving, self._avoidance.convicted_institutions)
        except RouteUnavailable as exc:
            self._next_move_s = now + MOVE_RETRY_S
            log.warning("nodes %s are leaving, but no other route can take the session yet: %s", sorted(leaving), exc)
            return False
        await self._close_streams()
        self.moves += 1
        await self._open_route(hops)  # a failure here is handled as any failed open: a failover
        log.info("moved off leaving nodes %s: new route %s", sorted(leaving), [h.node_id for h in self.hops])
        return True

    async def _fail_over(self, failure: HopsFailed) -> None:
        """Route around the failed hops; give up after max_failovers (refusals on the way cost none)."""
        await self._reopen(failure, failovers=True)
        log.warning("failover %d: new route %s", self.failovers, [h.node_id for h in self.hops])

    async def _step_once(self, hidden: torch.Tensor, start_position: int) -> torch.Tensor:
        """One step on the current route; a start_position below what it holds rewinds its caches first."""
        revoked = self.swarm.revoked()
        if dropped := {h.key for h in self.hops if h.institution in revoked}:
            raise HopsFailed("a node of the route belongs to a revoked institution", dead=dropped)
        started = asyncio.get_running_loop().time()
        await self._send(hidden, start_position)
        output, sketches = await self._wait_result(self._step_id, hidden.shape[1])
        self._stepped = start_position + hidden.shape[1]
        self.last_step = SentStep(self.session_id, hidden, start_position, output, sketches)
        self.swarm.step_completed(self.hops, hidden.shape[1], asyncio.get_running_loop().time() - started)
        if self.charge.meter is not None:
            self.charge.meter.stepped(self.session_id, self.charge.consumer, self.hops, hidden.shape[1], self._sent)
        return output

    async def _send(self, hidden: torch.Tensor, start_position: int) -> None:
        """Send a step to the first hop: with the opens, when the route is not open yet, else by Forward."""
        if not self._streams:
            try:
                await self._open_streams(first_step=self._request(hidden, start_position))
                return
            except HopsFailed as exc:
                await self._reopen(exc, failovers=False)
        request = self._request(hidden, start_position)
        first = self.hops[0]
        try:
            stub = self.channels.stub(first.endpoint, first.institution, first.node_id)
            ack = await stub.Forward(request, timeout=self.step_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise HopsFailed(f"node {first.node_id} is unreachable: {exc.code().name}", dead={first.key}) from exc
        if ack.HasField("error"):
            error = error_from_proto(ack.error)
            if isinstance(error, UnknownSession):  # the node dropped our session, or restarted and lost it
                raise await self._reported_failure(0, error)
            if is_capacity_refusal(error):
                raise HopsFailed(f"node {first.node_id} refused the step: {error}", refused={first.key})
            raise _peer_error(first, "refused the step", error) from error

    def _request(self, hidden: torch.Tensor, start_position: int) -> pb.StepRequest:
        """The next step of the session on the current route, counted as sent: the ceiling of what
        its hops may bill, whether it reaches them or not."""
        self._step_id += 1
        self._sent.add(hidden.shape[1])
        rewind = start_position < self._stepped
        signed = rewind_payload(self.session_id, self._step_id, start_position, hidden.shape[1])
        return pb.StepRequest(
            session_id=self.session_id,
            step_id=self._step_id,
            hidden=tensor_to_proto(hidden),
            start_position=start_position,
            route=self._route,
            route_signature=self._route_signature,
            rewind=rewind,
            rewind_signature=self._sign_route(signed) if rewind and self._sign_route is not None else b"",
        )

    async def _wait_result(self, step_id: int, n: int) -> tuple[torch.Tensor, list[pb.Sketch]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.step_timeout_s
        while True:
            try:
                index, event = await asyncio.wait_for(self._events.get(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                if dead := await unanswering(self.channels, self.hops):
                    raise HopsFailed("the step timed out", dead=dead) from None
                # Everyone answers, so someone is just slow: avoid this route, but do not brand it dead.
                raise HopsFailed("the step timed out", avoid={h.key for h in self.hops}) from None
            hop = self.hops[index]
            if event is None:
                raise HopsFailed(f"lost the session stream to node {hop.node_id}", dead={hop.key})
            kind = event.WhichOneof("kind")
            if kind == "result" and event.result.step_id == step_id and index == len(self.hops) - 1:
                try:
                    output = tensor_from_proto(
                        event.result.hidden,
                        expected_dtype=self.dtype,
                        expected_shape=(1, n, self.hidden_size),
                        name="hidden states from the last node",
                    )
                    return output, list(event.result.sketches)
                except InvalidTensor as exc:
                    raise _peer_error(hop, "sent an invalid result", exc) from exc
            if kind == "failed" and event.failed.step_id in (step_id, 0):
                error = error_from_proto(event.failed.error)
                if isinstance(error, PeerError | UnknownSession):
                    raise await self._reported_failure(index, error)
                if is_capacity_refusal(error):
                    raise HopsFailed(f"node {hop.node_id} refused the step: {error}", refused={hop.key})
                raise _peer_error(hop, "failed the step", error) from error

    async def _reported_failure(self, index: int, error: CoopError) -> HopsFailed:
        """Hop `index` reports that the step failed: it lost the session (UnknownSession, its word about
        itself: the session leaves it), or it could not push onward, which blames its next hop. A probe
        finds the dead first; a claim against a hop that answers is weighed by `SessionAvoidance.claim`."""
        if dead := await unanswering(self.channels, self.hops):
            return HopsFailed(str(error), dead=dead)
        reporter = self.hops[index]
        if isinstance(error, UnknownSession):
            # Alive without our session: it closed it (idle, or its cache share given to an institution
            # below its own) or restarted. The session leaves it, as if refused; no one is suspected.
            return HopsFailed(str(error), avoid={reporter.key}, refused={reporter.key})
        if index == len(self.hops) - 1:
            return HopsFailed(str(error), dead={reporter.key})
        return self._avoidance.claim(reporter, self.hops[index + 1], str(error))

    async def _abandon(self, failure: HopsFailed) -> None:
        self._avoidance.record(failure)
        for key in failure.dead:
            self.swarm.suspect(key)
        for key in failure.refused:
            self.swarm.refused(key)
        await self._close_streams()

    async def _close_streams(self) -> None:
        streams, self._streams = self._streams, []
        if self.charge.meter is not None and streams:
            hops = [stream.hop for stream in streams]
            self.charge.meter.session_ended(self.session_id, self.charge.consumer, hops, self._sent)
        self._sent = TokenTally()
        # bookkeeping first, with no await, so a cancellation cannot leak it
        reserved, self._reserved = self._reserved, []
        self.swarm.release(reserved)
        try:
            # A polite close lets each node free the session at once. The readers are cancelled only
            # afterwards: cancelling a task blocked in call.read() cancels the whole call, and a write
            # to a cancelled call raises CancelledError.
            for stream in streams:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, CoopError):
                    await stream.call.write(pb.SessionControl(close=pb.SessionControl.Close()))
                    await stream.call.done_writing()
        finally:
            for stream in streams:
                stream.reader.cancel()
                stream.call.cancel()

    async def close(self) -> None:
        await self._close_streams()


def _peer_error(hop: Hop, what: str, error: CoopError) -> PeerError:
    """A node's error (reported by it, or found in what it sent) as the PeerError the caller sees."""
    remote_type = type(error).__name__
    log.warning("node %s at %s %s: %s: %s", hop.node_id, hop.endpoint, what, remote_type, error)
    return PeerError(f"node {hop.node_id} {what} ({remote_type}): {error}", remote_type=remote_type)
