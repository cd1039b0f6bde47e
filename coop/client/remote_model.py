"""The research half of the Python SDK: the model's blocks through a coordinator, the rest here.

`RemoteModel` holds the model's client part (tokenizer, embeddings, head) in this process and
sends hidden states to a coordinator's chain relay (`coop.coordinator.http.relay`), which runs them
through the swarm's nodes on a route it keeps, fails over when a node dies, and bills the API
key's institution as for a chat request. Use `generate()` like transformers' generate, or open
an `InferenceSession` to step hidden states through every block yourself (custom decoding,
inspecting or editing hidden states)::

    with RemoteModel.from_pretrained(model_dir, "http://coordinator:8000", api_key=key) as model:
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16)
        with model.inference_session(max_length=64) as session:
            hidden = session.step(model.embed([prompt_ids]), token_ids=prompt_ids)
            next_id = int(model.logits(hidden)[0, -1].argmax())

The HTTP client is asyncio-based (so `generate` shares the coordinator's decoding loop) while most
research code is synchronous, so each RemoteModel owns one private event loop in a daemon thread
and hands coroutines to it.
"""

from __future__ import annotations

import contextlib
import operator
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import pydantic
import torch
from transformers import PreTrainedTokenizerBase

from coop.client.event_loop import LOOP_STOP_TIMEOUT_S, LoopThread
from coop.client.http import http_error, transport_error
from coop.client.relay import RelayChain
from coop.errors import CoopError, InvalidInput, SessionError
from coop.model.client_part import ClientPart
from coop.pipeline.generation import collect_tokens
from coop.pipeline.heads import head_batcher
from coop.pipeline.sampling import SamplingParams, with_defaults
from coop.swarm.routing import Hop
from coop.wire.tensors import check_finite

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 120.0  # one step may include a failover: a new route, and the session replayed on it


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


class _ClosedOnExit(ABC):
    """`with obj:` closes it on leaving, as the client's models and sessions both promise."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class RemoteModel(_ClosedOnExit):
    """A causal LM whose decoder blocks run on a pool's nodes, through a coordinator; embeddings and head run here.

    Thread-safe: several threads may generate or run sessions at once (each is its own session).
    Close it (or use it as a context manager) to close its sessions, HTTP connections and event loop.
    """

    def __init__(
        self,
        client: ClientPart,
        coordinator_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """Start the event loop and check that the coordinator answers (and takes the key); most callers
        want from_pretrained."""
        if not isinstance(coordinator_url, str):
            raise InvalidInput("coordinator_url must be the coordinator's URL, e.g. http://127.0.0.1:8000")
        self.client = client
        self.coordinator_url = coordinator_url.rstrip("/").removesuffix("/v1")
        self._closed = False
        self._close_lock = threading.Lock()
        self._sessions: weakref.WeakSet[InferenceSession] = weakref.WeakSet()
        self._loop = LoopThread(f"coop-remote-model-{id(self):x}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self._http = self._loop.run(self._connect(headers, timeout_s))
        except BaseException:
            self._loop.stop()
            raise

    async def _connect(self, headers: dict[str, str], timeout_s: float) -> httpx.AsyncClient:
        http = httpx.AsyncClient(base_url=self.coordinator_url, headers=headers, timeout=timeout_s)
        try:
            response = await http.get("/v1/models")
        except httpx.TransportError as exc:
            await http.aclose()
            raise transport_error(exc, http.base_url) from exc
        if response.status_code >= 400:
            await http.aclose()
            raise http_error(response.status_code, response.text)
        return http

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        coordinator_url: str,
        *,
        api_key: str | None = None,
        device: str | torch.device = "cpu",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> RemoteModel:
        """Load the client part of a prepared model and connect to the coordinator at coordinator_url.

        model_dir is a directory made by `coop model prepare`, the same one the pool serves (the
        coordinator refuses sessions for another content hash). api_key is the institution's key
        (`coop member key create`), which pays for the compute; a development coordinator (started
        without --api-keys) needs none. timeout_s bounds each HTTP call, a step's failover included.
        """
        client = ClientPart.load(model_dir, device=device)
        return cls(client, coordinator_url, api_key=api_key, timeout_s=timeout_s)

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

    def _chain(self, max_length: int) -> RelayChain:
        """A relay session (not yet open)."""
        return RelayChain(
            self._http,
            model_hash=self.client.manifest.content_hash,
            hidden_size=self.hidden_size,
            dtype=self.dtype,
            max_length=max_length,
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
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Like transformers' generate for one sequence: returns [1, n + k] = prompt + new tokens.

        Stops after max_new_tokens or at an end-of-sequence token, which is included, with no
        padding. Greedy unless do_sample; with do_sample, what temperature, top_p and top_k leave
        unset is the model's recommendation (its manifest's sampling defaults, as transformers takes
        them from generation_config), and `seed` makes the sampling repeatable.
        attention_mask is accepted so `model.generate(**tokenizer(text, return_tensors="pt"))`
        works; it must be all ones (batch size 1, no padding).
        """
        prompt = _as_token_ids(input_ids, "input_ids")
        if not prompt:
            raise InvalidInput("input_ids must contain at least one token")
        if attention_mask is not None and not bool(torch.all(attention_mask == 1)):
            raise InvalidInput("attention_mask must be all ones: batch size 1 without padding")
        if do_sample and temperature is not None and temperature <= 0:
            raise InvalidInput("do_sample=True needs temperature > 0 (use do_sample=False for greedy)")
        try:
            if do_sample:
                params = with_defaults(
                    self.client.manifest.sampling_defaults,
                    max_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    seed=seed,
                )
            else:
                params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, seed=seed)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InvalidInput(f"invalid sampling parameters: {problems}") from exc
        new_tokens = self._run(self._generate(prompt, params))
        device = input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")
        return torch.tensor([prompt + new_tokens], dtype=torch.long, device=device)

    async def _generate(self, prompt: list[int], params: SamplingParams) -> list[int]:
        chain = await self._chain(len(prompt) + params.max_tokens).open()
        try:
            tokens = await collect_tokens(self.client, chain, prompt, params)
        except BaseException:
            with contextlib.suppress(Exception):  # the coordinator ends a failed session itself
                await chain.close()
            raise
        await chain.close()
        return tokens

    def inference_session(self, max_length: int) -> InferenceSession:
        """Open a session through every block for up to max_length tokens.

        Use it as a context manager (or call close()): it holds a KV cache on every node of its route,
        and one of the API key's concurrent-request slots, until it is closed (or idle too long, when
        the coordinator closes it).
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
        """Close open sessions, the HTTP connections and the event loop; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            for session in list(self._sessions):
                with contextlib.suppress(Exception):
                    session.close()
            self._closed = True
            with contextlib.suppress(Exception):
                self._loop.run(self._http.aclose(), LOOP_STOP_TIMEOUT_S)
            self._loop.stop()
            head_batcher(self.client).wait_idle(LOOP_STOP_TIMEOUT_S)

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.coordinator_url
        return f"RemoteModel({self.client.manifest.name!r}, {state})"


AutoDistributedModelForCausalLM = RemoteModel
"""The name Petals users know, for `AutoDistributedModelForCausalLM.from_pretrained(...)`."""


class InferenceSession(_ClosedOnExit):
    """One session through every block, with a KV cache on each node of its route: step hidden states through it.

    Each `step` continues where the last one stopped (`position` counts the tokens so far). If a
    node fails, the coordinator moves the session to a new route and replays its tokens so far to
    rebuild the caches, which needs those tokens: pass `token_ids` (the ids of this step's tokens)
    to every step. A session stepped without them works the same until a node fails after the
    first step; then the step raises `ReplayUnavailable` instead of failing over. Replay re-embeds
    the token ids, so it is exact only when the hidden states you stepped were `embed(token_ids)`.

    A step the coordinator refuses or fails raises `ApiError` (`code` says why: "peer_error" for a
    node that failed in a way failover cannot fix, "session_not_found" for a session closed while
    idle, ...) and ends the session; bad input is caught here first, as `InvalidInput`, and leaves
    the session as it was.
    """

    def __init__(self, model: RemoteModel, max_length: int) -> None:
        self.model = model
        self.max_length = max_length
        self.position = 0
        self._lock = threading.Lock()
        self._closed = False
        self._chain = model._chain(max_length)
        model._run(self._chain.open())

    @property
    def session_id(self) -> str:
        """The coordinator's id of this session (GET /v1/coop/sessions/{session_id} describes it)."""
        return self._chain.session_id

    @property
    def route(self) -> list[Hop]:
        """The nodes this session runs on now, in block order (changes after a failover); asks the coordinator."""
        self.model._run(self._chain.refresh())
        return list(self._chain.hops)

    @property
    def failovers(self) -> int:
        """How many times the session moved to a new route; asks the coordinator."""
        self.model._run(self._chain.refresh())
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
        hidden = hidden.detach().to("cpu", self.model.dtype)
        check_finite(hidden, f"hidden (in {self.model.dtype})")
        with self._lock:
            if self._closed:
                raise SessionError("this inference session is closed")
            if self.position + n > self.max_length:
                raise InvalidInput(
                    f"the session would reach {self.position + n} tokens, beyond its max_length {self.max_length}"
                )
            try:
                output = self.model._run(self._chain.send(hidden, self.position, ids))
            except BaseException:
                # the coordinator ends a session whose step failed; make sure, and refuse further steps
                self._closed = True
                with contextlib.suppress(Exception):
                    self.model._run(self._chain.close())
                raise
            self.position += n
            return output

    def close(self) -> None:
        """Release the KV caches on the route's nodes; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.model.closed:
                self.model._run(self._chain.close())

    def __repr__(self) -> str:
        return f"InferenceSession(position={self.position}, max_length={self.max_length})"
