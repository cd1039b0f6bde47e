"""The chain relay: the SDK's research sessions, run by the coordinator and billed like chat requests.

Nodes serve sessions only to coordinators, so the SDK's `RemoteModel` keeps the client part
(embeddings, head) in its own process and sends hidden states here. A relay session is opened
exactly as a chat request is: the API key's concurrency slot, the consumer's credit floor, a
fair-share session slot, then a chain from the backend charged to the key's institution, whose
steps are metered and whose receipts are booked to it. The chain fails over as for chat, replaying
the token ids the client sent with its steps.

The session runs on the model whose content hash the client sends (a coordinator may serve several).

A session holds its slots until it is closed, by the client or, once idle for `idle_timeout_s`,
by the relay. What one institution's relay sessions reserve on the nodes (their max_length
together) is capped at `max_tokens_per_institution`, however many API keys it holds: an SDK
session pins KV cache on every node of its route between steps, and the nodes count it against the
same institution (coop/node/cache_shares.py). Everything a client sends is checked here (body size
before parsing, dtype, shape, finiteness, positions, token ids), so what a node refuses is never the
client's doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import anyio
import torch
from google.protobuf.message import DecodeError

from coop.config import DEFAULT_SESSION_IDLE_TIMEOUT_S, CoordinatorSettings
from coop.coordinator.accounts.fair_share_admission import RequestAdmission
from coop.coordinator.catalog import ModelCatalog
from coop.coordinator.http.auth import ApiKeyGate, Caller
from coop.coordinator.http.protocol import RelayOpenRequest, RelaySessionInfo
from coop.coordinator.http.request_slots import enter_request
from coop.coordinator.http.text_stream import close_quietly, route_hops
from coop.errors import InvalidInput, InvalidTensor, ReplayUnavailable, RequestError, RequestTooLarge
from coop.pipeline.backend import Backend
from coop.pipeline.generation import Chain
from coop.wire.generated import coop_pb2 as pb
from coop.wire.tensors import tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)

MAX_REAP_INTERVAL_S = 5.0
# A step body beyond its hidden states: at most 10 bytes per token id (a varint) and the envelope
# (field tags, lengths, the dtype name, the shape).
TOKEN_ID_BYTES = 10
DEFAULT_MAX_RELAY_TOKENS: int = CoordinatorSettings.model_fields["max_relay_tokens_per_institution"].default
ENVELOPE_BYTES = 256


@dataclass(eq=False)
class RelaySession:
    session_id: str
    backend: Backend  # the model it runs on
    owner: str | None  # the digest of the API key that opened it: no other key may use it
    institution: str | None  # the key's institution, whose relay tokens it holds (None: development mode)
    chain: Chain
    max_length: int
    slots: AsyncExitStack  # the key's concurrency slot and the admission slot, given back on close
    last_used_s: float
    position: int = 0  # tokens stepped so far
    token_ids: list[int] = field(default_factory=list)  # of every position; 0 where a step came without
    missing_from: int | None = None  # position of the first step without token ids
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time


class ChainRelay:
    """The relay sessions of one coordinator; all methods run on its event loop."""

    def __init__(
        self,
        models: Backend | ModelCatalog,
        gate: ApiKeyGate,
        access: RequestAdmission | None = None,
        *,
        idle_timeout_s: float = DEFAULT_SESSION_IDLE_TIMEOUT_S,
        max_tokens_per_institution: int = DEFAULT_MAX_RELAY_TOKENS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`models`: what sessions may run on, by content hash; `access`: credit floors and fair-share
        admission, as for chat (None: development mode). `clock`: what idleness is measured by."""
        self.catalog = models if isinstance(models, ModelCatalog) else ModelCatalog.single(models)
        self.gate = gate
        self.access = access
        self.idle_timeout_s = idle_timeout_s
        self.max_tokens_per_institution = max_tokens_per_institution
        self.clock = clock
        self._reserved_tokens: Counter[str] = Counter()  # institution -> max_length of its open sessions
        self._sessions: dict[str, RelaySession] = {}
        self._reaper: asyncio.Task[None] | None = None

    def max_length(self, caller: Caller, backend: Backend) -> int:
        """The longest session caller may open: the model's context, and the pool's per-request limit."""
        if caller.key_digest is None:
            return backend.max_context
        return min(backend.max_context, self.gate.limits.max_tokens_per_request)

    async def open(self, caller: Caller, request: RelayOpenRequest) -> RelaySessionInfo:
        model = self.catalog.by_hash(request.model_hash)
        if model is None:
            served = ", ".join(f"{m.name!r} with content hash {m.model_hash}" for m in self.catalog)
            raise RequestError(
                f"this coordinator serves {served}, but yours is {request.model_hash}: load the same prepared "
                "model directory as the pool's nodes",
                code="model_mismatch",
                param="model_hash",
            )
        backend = model.backend
        limit = self.max_length(caller, backend)
        if request.max_length > limit:
            raise RequestError(
                f"max_length {request.max_length} is over this coordinator's limit of {limit} tokens per session",
                code="context_length_exceeded",
                param="max_length",
            )
        slots = AsyncExitStack()
        self._reserve_tokens(caller, request.max_length, slots)
        try:
            charge, _ = await enter_request(slots, self.gate, self.access, caller, model.model_hash)
            chain = await backend.open_chain(request.max_length, charge)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await slots.aclose()
            raise
        session = RelaySession(
            uuid.uuid4().hex,
            backend,
            caller.key_digest,
            caller.institution,
            chain,
            request.max_length,
            slots,
            self.clock(),
        )
        self._sessions[session.session_id] = session
        self._start_reaper()
        return self.describe(session)

    def _reserve_tokens(self, caller: Caller, max_length: int, slots: AsyncExitStack) -> None:
        """Count the session's max_length against its institution's relay tokens, given back with `slots`
        (taken with no await before, so opens side by side cannot all slip under the cap)."""
        institution = caller.institution
        if institution is None:
            return
        held = self._reserved_tokens[institution]
        if held + max_length > self.max_tokens_per_institution:
            raise RequestError(
                f"{institution}'s SDK sessions already reserve {held:,} tokens; this one's max_length {max_length:,} "
                f"would pass the {self.max_tokens_per_institution:,} one institution may hold open: close idle "
                "sessions or ask for a shorter max_length",
                status=429,
                code="relay_tokens_exceeded",
                param="max_length",
            )
        self._reserved_tokens[institution] += max_length
        slots.callback(self._give_tokens, institution, max_length)

    def _give_tokens(self, institution: str, tokens: int) -> None:
        self._reserved_tokens[institution] -= tokens
        if self._reserved_tokens[institution] <= 0:
            del self._reserved_tokens[institution]

    def session(self, caller: Caller, session_id: str) -> RelaySession:
        """The caller's open session session_id; 404 for any other (closed, unknown, or another key's)."""
        session = self._sessions.get(session_id)
        if session is None or session.owner != caller.key_digest:
            raise RequestError(
                f"no open session {session_id!r} for this API key: it was closed, ended by an error, or idle "
                f"for over {self.idle_timeout_s:g} s; open a new one",
                status=404,
                code="session_not_found",
                param="session_id",
            )
        return session

    def describe(self, session: RelaySession) -> RelaySessionInfo:
        return RelaySessionInfo(
            session_id=session.session_id,
            model=session.backend.model_name,
            max_length=session.max_length,
            position=session.position,
            failovers=session.chain.failovers,
            route=route_hops(session.chain),
        )

    def body_limit(self, session: RelaySession) -> int:
        """The largest step body session can take now: hidden states and ids for the rest of its length."""
        return _body_bytes(session.backend, session.max_length - session.position)

    def largest_body(self) -> int:
        """The largest step body any session can take: a whole context in one step, of any model."""
        return max(_body_bytes(m.backend, m.backend.max_context) for m in self.catalog)

    async def step(self, session: RelaySession, body: bytes) -> bytes:
        """A serialized RelayStep -> the serialized Tensor of the states after the last block."""
        async with session.lock:
            if self._sessions.get(session.session_id) is not session:
                raise RequestError("the session was closed during this request", status=404, code="session_not_found")
            session.last_used_s = self.clock()
            if len(body) > (limit := self.body_limit(session)):
                raise RequestTooLarge(
                    f"the body has {len(body):,} bytes, over the {limit:,} this session can take now; "
                    "send fewer tokens per step, or check the tensor's dtype and shape"
                )
            hidden, ids = self._parse_step(session, body)
            start, n = session.position, hidden.shape[1]
            known = session.token_ids + (ids if ids is not None else [0] * n)
            failovers, hops = session.chain.failovers, session.chain.hops
            try:
                output = await session.chain.step(hidden, start, known)
                # a new route (a failover, or a planned move off a draining node) replayed the tokens
                moved = session.chain.failovers > failovers or session.chain.hops is not hops
                if moved and session.missing_from is not None:
                    raise ReplayUnavailable(
                        f"the session moved to a new route at position {start} (a node failed or left), but the step "
                        f"at position {session.missing_from} was sent without token_ids, so the tokens replayed "
                        "there are unknown; pass token_ids with every step, or open a new session"
                    )
            except BaseException:
                # what the chain did cannot be undone (caches advanced, a failover half done): the session ends
                await self._end(session)
                raise
            session.token_ids = known
            if ids is None and session.missing_from is None:
                session.missing_from = start
            session.position = start + n
            session.last_used_s = self.clock()
            return tensor_to_proto(output).SerializeToString()

    def _parse_step(self, session: RelaySession, body: bytes) -> tuple[torch.Tensor, list[int] | None]:
        message = pb.RelayStep()
        try:
            message.ParseFromString(body)
        except DecodeError as exc:
            raise InvalidInput(f"the step body is not a serialized coop.v1.RelayStep: {exc}") from exc
        if not message.HasField("hidden"):
            raise InvalidInput("the step has no hidden states")
        if message.start_position != session.position:
            raise InvalidInput(
                f"start_position {message.start_position} is not the session's position {session.position}: "
                "each step continues where the last one stopped"
            )
        room = session.max_length - session.position
        shape = list(message.hidden.shape)
        if len(shape) == 3 and shape[1] > room:
            raise InvalidInput(
                f"the session would reach {session.position + shape[1]} tokens, beyond its max_length "
                f"{session.max_length}"
            )
        backend = session.backend
        try:
            hidden = tensor_from_proto(
                message.hidden,
                expected_dtype=backend.client.dtype,
                expected_shape=(1, None, backend.client.manifest.hidden_size),
                max_bytes=room * _token_bytes(backend),
                name="hidden",
            )
        except InvalidTensor as exc:  # the client's tensor: its 400, not the 502 a node's would be
            raise InvalidInput(str(exc)) from exc
        n = hidden.shape[1]
        if n == 0:
            raise InvalidInput("a step needs at least one token")
        ids = list(message.token_ids)
        if not ids:
            return hidden, None
        if len(ids) != n:
            raise InvalidInput(f"token_ids has {len(ids)} ids for {n} hidden states")
        vocab = backend.client.manifest.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidInput(f"token_ids must lie in [0, {vocab})")
        return hidden, ids

    async def close(self, caller: Caller, session_id: str) -> None:
        session = self.session(caller, session_id)
        async with session.lock:  # after a step in flight
            await self._end(session)

    async def close_idle(self) -> list[str]:
        """Close the sessions idle for longer than idle_timeout_s (a step in flight is not idle)."""
        deadline = self.clock() - self.idle_timeout_s
        idle = [s for s in self._sessions.values() if s.last_used_s < deadline and not s.lock.locked()]
        for session in idle:  # all forgotten before the first await, so none can start a step meanwhile
            del self._sessions[session.session_id]
        for session in idle:
            log.info("closed relay session %s: idle for over %g s", session.session_id, self.idle_timeout_s)
            await self._release(session)
        return [s.session_id for s in idle]

    async def _end(self, session: RelaySession) -> None:
        if self._sessions.pop(session.session_id, None) is not None:
            await self._release(session)

    @staticmethod
    async def _release(session: RelaySession) -> None:
        """Close session's chain and give its slots back, even if the request is cancelled."""
        with anyio.CancelScope(shield=True):
            await close_quietly(session.chain)
            await session.slots.aclose()

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="relay-reaper")

    async def _reap(self) -> None:
        interval_s = min(self.idle_timeout_s / 2, MAX_REAP_INTERVAL_S)
        while self._sessions:
            await asyncio.sleep(interval_s)
            try:
                await self.close_idle()
            except Exception:
                log.exception("closing idle relay sessions failed")

    async def aclose(self) -> None:
        """Close every session (the coordinator is stopping)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for session in list(self._sessions.values()):
            await self._end(session)


def _token_bytes(backend: Backend) -> int:
    """Bytes of one token's hidden state on the wire."""
    return backend.client.manifest.hidden_size * backend.client.dtype.itemsize


def _body_bytes(backend: Backend, tokens: int) -> int:
    return tokens * (_token_bytes(backend) + TOKEN_ID_BYTES) + ENVELOPE_BYTES
