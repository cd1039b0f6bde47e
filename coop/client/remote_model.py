"""The research half of the Python SDK: drive the swarm from this process, without a coordinator.

`RemoteModel` holds the model's client part (tokenizer, embeddings, head) here and runs the
decoder blocks on the swarm's nodes, found through the DHT. Use `generate()` like transformers'
generate, or open an `InferenceSession` to step hidden states through every remote block yourself
(custom decoding, inspecting or editing hidden states)::

    with RemoteModel.from_pretrained(model_dir, [dht_peer]) as model:
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16)
        with model.inference_session(max_length=64) as session:
            hidden = session.step(model.embed([prompt_ids]), token_ids=prompt_ids)
            next_id = int(model.logits(hidden)[0, -1].argmax())

The network code (`RemoteChain`, `SwarmView`, gRPC channels) is asyncio-based while most research
code is synchronous, so each RemoteModel owns one private event loop in a daemon thread and hands
coroutines to it; gRPC channels are bound to the loop that created them, so they live there too.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import threading
import weakref
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pydantic
import torch
from transformers import PreTrainedTokenizerBase

from coop.client.event_loop import LOOP_STOP_TIMEOUT_S, LoopThread
from coop.config import DEFAULT_POOL_ID
from coop.errors import CoopError, InvalidInput, ReplayUnavailable, SessionError
from coop.model.client_part import ClientPart
from coop.pipeline.generation import collect_tokens
from coop.pipeline.remote import RemoteChain
from coop.pipeline.sampling import SamplingParams
from coop.pool.membership import Membership
from coop.swarm.announcement import announcement_validator
from coop.swarm.directory import SwarmDirectory
from coop.swarm.revocations import RevocationWatcher
from coop.swarm.routing import Hop
from coop.swarm.validation import pool_record_validator
from coop.swarm.view import SwarmView
from coop.wire.channels import ChannelPool
from coop.wire.tensors import check_finite

log = logging.getLogger(__name__)

T = TypeVar("T")


def _as_token_ids(token_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]], what: str) -> list[int]:
    """[1, n] tensor, [[...]] or [...] -> a flat list of ints (batch size 1 only)."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.ndim == 2 and token_ids.shape[0] == 1:
            token_ids = token_ids[0]
        if token_ids.ndim != 1:
            raise InvalidInput(f"{what} must have shape (1, n), got {tuple(token_ids.shape)}")
        if token_ids.is_floating_point() or token_ids.is_complex():
            raise InvalidInput(f"{what} must be integer token ids, got {token_ids.dtype}")
        return [int(t) for t in token_ids.tolist()]
    items: list[object] = list(token_ids)
    if len(items) == 1 and isinstance(items[0], Sequence):
        items = list(items[0])
    try:
        if any(isinstance(t, bool) for t in items):
            raise TypeError("bool is not a token id")
        return [operator.index(t) for t in items]  # type: ignore[arg-type]  # ints, numpy ints
    except TypeError as exc:
        raise InvalidInput(f"{what} must be a list of ints or a (1, n) tensor (batch size 1 only)") from exc


class RemoteModel:
    """A causal LM whose decoder blocks run on the swarm; embeddings and head run here.

    Thread-safe: several threads may generate or run sessions at once (each gets its own route).
    Close it (or use it as a context manager) to stop its event loop, gRPC channels and DHT peer.
    """

    def __init__(
        self,
        client: ClientPart,
        directory: SwarmDirectory,
        membership: Membership,
        *,
        step_timeout_s: float = 30.0,
        max_failovers: int = 3,
        refresh_s: float = 1.0,
    ) -> None:
        """Start the event loop, the channels and the swarm view; most callers want from_pretrained.

        `membership` decides, as for a coordinator, the pool, the TLS credentials, which announcements
        are believed (signed by a member of this pool) and which institutions are revoked.
        """
        self.client = client
        self.directory = directory
        self.membership = membership
        self.pool_id = membership.pool_id
        self.step_timeout_s = step_timeout_s
        self.max_failovers = max_failovers
        self._closed = False
        self._close_lock = threading.Lock()
        self._sessions: weakref.WeakSet[InferenceSession] = weakref.WeakSet()
        self._revocations = RevocationWatcher(membership.revocations, directory).start()
        self._loop = LoopThread(f"coop-remote-model-{id(self):x}")
        try:
            self._channels, self.swarm = self._loop.run(self._start(refresh_s))
        except BaseException:
            self._loop.stop()
            self._revocations.stop()
            raise

    async def _start(self, refresh_s: float) -> tuple[ChannelPool, SwarmView]:
        channels = ChannelPool(self.membership.channel_security())
        swarm = SwarmView(
            self.directory,
            pool_id=self.pool_id,
            model_hash=self.client.manifest.content_hash,
            num_blocks=self.client.manifest.num_blocks,
            refresh_s=refresh_s,
            validator=announcement_validator(self.membership),
            revoked=self.membership.revocations,
        )
        return channels, await swarm.start()

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        initial_peers: Sequence[str],
        *,
        member: str | Path | None = None,
        pool_id: str = DEFAULT_POOL_ID,
        device: str | torch.device = "cpu",
        step_timeout_s: float = 30.0,
        max_failovers: int = 3,
        dht_host: str = "127.0.0.1",
    ) -> RemoteModel:
        """Load the client part of a prepared model and join the swarm through initial_peers.

        model_dir is a directory made by `coop model prepare` (the same one the nodes serve: its
        content hash picks the nodes). `member` is the institution's member bundle (mutual TLS,
        signed announcements only, revocations honoured); without one, the development pool
        `pool_id` in plaintext. The DHT peer runs in client mode: it looks nodes up but serves no
        DHT requests, so it needs no reachable address.
        """
        if isinstance(initial_peers, str):
            raise InvalidInput("initial_peers must be a list of multiaddrs, not one string")
        membership = Membership.load(None if member is None else Path(member), pool_id=pool_id)
        client = ClientPart.load(model_dir, device=device)
        validator = pool_record_validator(membership)
        directory = SwarmDirectory.start(list(initial_peers), dht_host, 0, client_mode=True, validator=validator)
        try:
            return cls(client, directory, membership, step_timeout_s=step_timeout_s, max_failovers=max_failovers)
        except BaseException:
            directory.shutdown()
            raise

    # -- the local parts ------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.client.tokenizer

    @property
    def hidden_size(self) -> int:
        return self.client.manifest.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of hidden states between blocks (what `embed` returns and `step` expects)."""
        return self.client.dtype

    def embed(self, token_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        """Token ids [1, n] (a tensor or a list) -> input hidden states [1, n, hidden], in this process."""
        return self.client.embed(torch.tensor([_as_token_ids(token_ids, "token_ids")], dtype=torch.long))

    def logits(self, hidden: torch.Tensor, *, last_only: bool = True) -> torch.Tensor:
        """Hidden states after the last block [1, n, hidden] -> float32 logits [1, 1 (or n), vocab]."""
        return self.client.logits(hidden, last_only=last_only)

    # -- the remote part ------------------------------------------------------------------------

    def _chain(self, max_length: int, session: InferenceSession | None = None) -> RemoteChain:
        """A RemoteChain (not yet open); a session's chain replays through the session's own check."""
        return RemoteChain(
            self.swarm,
            self._channels,
            self.client.embed if session is None else session._replay_embed,
            hidden_size=self.hidden_size,
            dtype=self.dtype,
            max_length=max_length,
            step_timeout_s=self.step_timeout_s,
            max_failovers=self.max_failovers,
        )

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise CoopError("this RemoteModel is closed")
        return self._loop.run(coro)

    def generate(
        self,
        input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
        max_new_tokens: int = 20,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Like transformers' generate for one sequence: returns [1, n + k] = prompt + new tokens.

        Stops after max_new_tokens or at an end-of-sequence token, which is included, with no
        padding. Greedy unless do_sample; with do_sample, `seed` makes the sampling repeatable.
        attention_mask is accepted so `model.generate(**tokenizer(text, return_tensors="pt"))`
        works; it must be all ones (batch size 1, no padding).
        """
        prompt = _as_token_ids(input_ids, "input_ids")
        if not prompt:
            raise InvalidInput("input_ids must contain at least one token")
        if attention_mask is not None and not bool(torch.all(attention_mask == 1)):
            raise InvalidInput("attention_mask must be all ones: batch size 1 without padding")
        if do_sample and temperature <= 0:
            raise InvalidInput("do_sample=True needs temperature > 0 (use do_sample=False for greedy)")
        try:
            params = SamplingParams(
                max_tokens=max_new_tokens,
                temperature=temperature if do_sample else 0.0,
                top_p=top_p if do_sample else 1.0,
                top_k=top_k if do_sample else 0,
                seed=seed,
            )
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InvalidInput(f"invalid sampling parameters: {problems}") from exc
        new_tokens = self._run(self._generate(prompt, params))
        device = input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")
        return torch.tensor([prompt + new_tokens], dtype=torch.long, device=device)

    async def _generate(self, prompt: list[int], params: SamplingParams) -> list[int]:
        chain = await self._chain(len(prompt) + params.max_tokens).open()
        try:
            return await collect_tokens(self.client, chain, prompt, params)
        finally:
            await chain.close()

    def inference_session(self, max_length: int) -> InferenceSession:
        """Open a session on a route through every block for up to max_length tokens.

        Use it as a context manager (or call close()): it holds a KV cache on every node of its route.
        """
        if max_length < 1:
            raise InvalidInput(f"max_length must be at least 1, got {max_length}")
        session = InferenceSession(self, max_length)
        self._sessions.add(session)
        return session

    # -- lifetime -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close open sessions, stop the swarm view, channels, event loop and DHT peer; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            for session in list(self._sessions):
                with contextlib.suppress(Exception):
                    session.close()
            self._closed = True
            try:
                with contextlib.suppress(Exception):
                    self._loop.run(self._stop(), LOOP_STOP_TIMEOUT_S)
                self._loop.stop()
            finally:
                self._revocations.stop()
                self.directory.shutdown()

    async def _stop(self) -> None:
        await self.swarm.stop()
        await self._channels.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pool {self.pool_id!r}"
        return f"RemoteModel({self.client.manifest.name!r}, {state})"


AutoDistributedModelForCausalLM = RemoteModel
"""The name Petals users know, for `AutoDistributedModelForCausalLM.from_pretrained(...)`."""


class InferenceSession:
    """One route through every block with a KV cache on each node: step hidden states through it.

    Each `step` continues where the last one stopped (`position` counts the tokens so far). If a
    node fails, the session picks a new route and replays the tokens so far to rebuild the caches,
    which needs those tokens: pass `token_ids` (the ids of this step's tokens) to every step. A
    session stepped without them works the same until a node fails after the first step; then the
    step raises `ReplayUnavailable` instead of failing over. Replay re-embeds the token ids, so it
    is exact only when the hidden states you stepped were `embed(token_ids)`. A node that fails in
    a way failover cannot fix (it reports an error, or sends states that fail validation) makes the
    step raise `PeerError`, whose `remote_type` names the node's error.
    """

    def __init__(self, model: RemoteModel, max_length: int) -> None:
        self.model = model
        self.max_length = max_length
        self.position = 0
        self._token_ids: list[int] = []
        self._missing_from: int | None = None  # position of the first step without token ids
        self._lock = threading.Lock()
        self._closed = False
        self._chain = model._chain(max_length, self)
        model._run(self._chain.open())

    @property
    def route(self) -> list[Hop]:
        """The nodes this session runs on now, in block order (changes after a failover)."""
        return list(self._chain.hops)

    @property
    def failovers(self) -> int:
        return self._chain.failovers

    def step(self, hidden: torch.Tensor, token_ids: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Input hidden states [1, n, hidden] of the next n tokens -> their states after the last block.

        token_ids, the n ids these states embed, let the session fail over to a new route (see the
        class docstring). Returns [1, n, hidden] in the model dtype, on the CPU.
        """
        if hidden.ndim != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self.model.hidden_size:
            raise InvalidInput(f"hidden must have shape (1, n, {self.model.hidden_size}), got {tuple(hidden.shape)}")
        n = hidden.shape[1]
        if n == 0:
            raise InvalidInput("a step needs at least one token")
        ids = None if token_ids is None else _as_token_ids(token_ids, "token_ids")
        if ids is not None and len(ids) != n:
            raise InvalidInput(f"token_ids has {len(ids)} ids for {n} hidden states")
        # Checked here, so that what a node rejects is the node's fault (a PeerError), never the caller's.
        hidden = hidden.detach().to("cpu", self.model.dtype)
        check_finite(hidden, f"hidden (in {self.model.dtype})")
        with self._lock:
            if self._closed:
                raise SessionError("this inference session is closed")
            if self.position + n > self.max_length:
                raise InvalidInput(
                    f"the session would reach {self.position + n} tokens, beyond its max_length {self.max_length}"
                )
            start = self.position
            known = self._token_ids + (ids if ids is not None else [0] * n)
            try:
                output = self.model._run(self._chain.step(hidden, start, known))
            except ReplayUnavailable:
                # the chain already moved to a new route whose caches are empty: nothing can continue
                self._closed = True
                with contextlib.suppress(Exception):
                    self.model._run(self._chain.close())
                raise
            self._token_ids = known
            if ids is None and self._missing_from is None:
                self._missing_from = start
            self.position = start + n
            return output

    def _replay_embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Called by the chain on failover, with the session's tokens before the failed step."""
        if self._missing_from is not None:
            raise ReplayUnavailable(
                f"a node failed at position {self.position} and the session cannot move to a new route: "
                f"the step at position {self._missing_from} was given without token_ids, so the tokens to "
                "replay are unknown; pass token_ids to every step, or open a new session"
            )
        return self.model.client.embed(token_ids)

    def close(self) -> None:
        """Release the KV caches on the route's nodes; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.model.closed:
                self.model._run(self._chain.close())

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"InferenceSession(position={self.position}, max_length={self.max_length})"
