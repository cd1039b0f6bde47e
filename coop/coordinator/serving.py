"""The logic behind the OpenAI-compatible endpoints, free of HTTP details.

A request becomes prompt ids (the chat template for chat) and `SamplingParams`; the decoding
loop runs over a chain the backend opens for this request alone and always closes; the token
stream becomes text through an incremental detokeniser that applies stop sequences. Streamed and
non-streamed responses are built from the same events, so their text is identical by
construction.

Errors of every origin become OpenAI's error envelope in one place, `error_response`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, cast

import anyio
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from coop.coordinator.backend import Backend
from coop.coordinator.generation import Chain, generate_tokens
from coop.coordinator.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    CoopExtras,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    FinishReason,
    GenerationRequest,
    HealthResponse,
    ModelCard,
    ModelList,
    Usage,
)
from coop.coordinator.sampling import SamplingParams
from coop.errors import (
    CacheBudgetExceeded,
    CoopError,
    InvalidInput,
    PeerError,
    RouteUnavailable,
)

log = logging.getLogger(__name__)

# When the request names no max_tokens. Every session reserves KV cache for prompt + max_tokens
# on each node of its route, so "the rest of the context" (vLLM's default) would be costly.
DEFAULT_CHAT_MAX_TOKENS = 512
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# -- errors -----------------------------------------------------------------------------------


class RequestError(InvalidInput):
    """A request the API refuses, with the HTTP status and OpenAI error code to answer with."""

    def __init__(self, message: str, *, status: int = 400, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


# Our exception types -> (HTTP status, OpenAI error type, code). The most specific class in an
# exception's MRO wins, so a new CoopError subclass falls back to its parent's row.
ERROR_TABLE: dict[type[BaseException], tuple[int, str, str]] = {
    InvalidInput: (400, "invalid_request_error", "invalid_input"),
    RouteUnavailable: (503, "service_unavailable_error", "route_unavailable"),
    # Capacity, not a bug: the same request can succeed once other sessions finish.
    CacheBudgetExceeded: (503, "service_unavailable_error", "capacity_exceeded"),
    PeerError: (502, "server_error", "peer_error"),
    CoopError: (500, "server_error", "internal_error"),
}


def error_response(exc: BaseException) -> tuple[int, ErrorResponse]:
    """Any exception -> (HTTP status, OpenAI error envelope). The API's only error mapping."""
    if isinstance(exc, RequestError):
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return exc.status, _envelope(str(exc), kind, exc.code, exc.param)
    if isinstance(exc, RequestValidationError):
        message, param, code = _describe_validation_error(exc)
        return 400, _envelope(message, "invalid_request_error", code, param)
    if isinstance(exc, HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return exc.status_code, _envelope(str(exc.detail), kind, None, None)
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            status, kind, code = ERROR_TABLE[cls]
            return status, _envelope(str(exc), kind, code, None)
    log.error("unexpected error while serving a request", exc_info=exc)
    message = f"internal error ({type(exc).__name__}); the coordinator's log has the details"
    return 500, _envelope(message, "server_error", "internal_error", None)


def _envelope(message: str, kind: str, code: str | None, param: str | None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """FastAPI's error list -> one readable message, the first offending field, and a code."""
    errors: Sequence[Any] = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", error.get("msg", ""))
            return f"the request body is not valid JSON: {detail}", None, "invalid_json"
    parts: list[str] = []
    params: list[str] = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = ".".join(loc) or "body"
        if loc:
            params.append(loc[0])  # the top-level field, as OpenAI's `param` names it
        part = f"{field}: {error.get('msg', 'invalid')}"
        if part not in parts:
            parts.append(part)
    message = "invalid request: " + "; ".join(parts[:5]) if parts else "invalid request"
    return message, (params[0] if params else None), "invalid_request"


# -- detokenisation ---------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Token ids so far -> the new text that is safe to show, with stop sequences applied.

    It decodes the whole completion each time and emits the suffix beyond what it already
    emitted: a token's text depends on its neighbours (byte-level pieces, leading spaces), so
    decoding tokens one by one would be wrong. It holds back a trailing U+FFFD (a multi-byte
    character whose remaining bytes are still to come) and any tail that could still grow into
    a stop sequence. Decoding everything is O(n) per token; fine at these lengths, and the place
    to add prefix/read offsets if it ever shows up in a profile.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, token_ids: list[int]) -> str:
        full = self._decode(token_ids)
        floor = len(self.text)
        hit = self._find_stop(full)
        if hit is not None:
            self.stopped = True
            return self._emit(full, max(hit, floor))  # the text is cut before the stop string
        end = _strip_partial_char(full, floor)
        end -= self._stop_prefix_length(full[:end], floor)
        return self._emit(full, end)

    def finish(self, token_ids: list[int]) -> str:
        """The generation ended (EOS or length): release held-back text but a partial character."""
        full = self._decode(token_ids)
        return self._emit(full, _strip_partial_char(full, len(self.text)))

    def _emit(self, full: str, end: int) -> str:
        # Decoding is prefix-stable for the tokenizers we serve; if it ever is not, the emitted
        # text cannot be taken back, so we continue from the same character offset.
        delta = full[len(self.text) : end] if end > len(self.text) else ""
        self.text += delta
        return delta

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_length(self, text: str, floor: int) -> int:
        """Length of the longest tail of text (beyond floor) that is a proper prefix of a stop."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text) - floor), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


def _strip_partial_char(text: str, floor: int) -> int:
    end = len(text)
    while end > floor and text[end - 1] == "\ufffd":
        end -= 1
    return end


# -- the generation core ----------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The chain is open: from here on, failures are reported inside the stream."""


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    token_ids: list[int]  # every generated token, EOS included
    prompt_tokens: int
    route: list[dict[str, Any]]

    @property
    def usage(self) -> Usage:
        completion = len(self.token_ids)
        return Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=completion, total_tokens=self.prompt_tokens + completion
        )

    @property
    def extras(self) -> CoopExtras:
        return CoopExtras(token_ids=self.token_ids, route=self.route)


GenerationEvent = Started | TextDelta | Finished


async def run_generation(
    backend: Backend, prompt_ids: list[int], params: SamplingParams
) -> AsyncGenerator[GenerationEvent, None]:
    """Started, then text deltas, then Finished. The chain is closed however this ends."""
    chain = await backend.open_chain(len(prompt_ids) + params.max_tokens)
    try:
        yield Started()
        client = backend.client
        detokenizer = IncrementalDetokenizer(client.decode, params.stop)
        token_ids: list[int] = []
        finish_reason: FinishReason = "length"
        # generate_tokens is an async generator (typed as an iterator): close it when we stop early
        token_gen = cast(AsyncGenerator[int, None], generate_tokens(client, chain, prompt_ids, params))
        async with aclosing(token_gen) as tokens:
            async for token in tokens:
                token_ids.append(token)
                if token in client.eos_token_ids:
                    finish_reason = "stop"
                    break
                delta = detokenizer.push(token_ids)
                if delta:
                    yield TextDelta(delta)
                if detokenizer.stopped:
                    finish_reason = "stop"
                    break
        if not detokenizer.stopped:
            text_ids = token_ids[:-1] if token_ids and token_ids[-1] in client.eos_token_ids else token_ids
            tail = detokenizer.finish(text_ids)
            if tail:
                yield TextDelta(tail)
        yield Finished(finish_reason, token_ids, len(prompt_ids), backend.route_info(chain))
    finally:
        await _close_quietly(chain)


async def _close_quietly(chain: Chain) -> None:
    """Close even when the request was cancelled (client gone), and never mask the real error."""
    try:
        with anyio.CancelScope(shield=True):
            await chain.close()
    except Exception:
        log.warning("closing a chain failed", exc_info=True)


async def _collect(events: AsyncGenerator[GenerationEvent, None]) -> tuple[str, Finished]:
    parts: list[str] = []
    async with aclosing(events):
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                return "".join(parts), event
    raise RuntimeError("generation ended without a Finished event")  # pragma: no cover


# -- the endpoints' logic ---------------------------------------------------------------------

Render = Callable[[GenerationEvent], list[BaseModel]]


class OpenAIServing:
    """One instance per app; holds nothing per request."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.created = int(time.time())

    def health(self) -> HealthResponse:
        return HealthResponse(model=self.backend.model_name)

    def models(self) -> ModelList:
        card = ModelCard(id=self.backend.model_name, created=self.created, max_model_len=self.backend.max_context)
        return ModelList(data=[card])

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        self._check_common(request)
        if not request.messages:
            raise RequestError("messages must not be empty", param="messages")
        prompt_ids = self.backend.client.encode_chat([_message_dict(m, i) for i, m in enumerate(request.messages)])
        params = self._sampling_params(request, len(prompt_ids), DEFAULT_CHAT_MAX_TOKENS)
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = run_generation(self.backend, prompt_ids, params)
        if request.stream:
            render = _chat_renderer(response_id, created, self.backend.model_name, request.include_usage)
            return await _start_stream(events, render)
        text, done = await _collect(events)
        return ChatCompletionResponse(
            id=response_id,
            created=created,
            model=self.backend.model_name,
            choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=done.finish_reason)],
            usage=done.usage,
            coop=done.extras,
        )

    async def complete(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        self._check_common(request)
        prompt_ids = self._completion_prompt(request)
        params = self._sampling_params(request, len(prompt_ids), DEFAULT_COMPLETION_MAX_TOKENS)
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        events = run_generation(self.backend, prompt_ids, params)
        if request.stream:
            render = _completion_renderer(response_id, created, self.backend.model_name, request.include_usage)
            return await _start_stream(events, render)
        text, done = await _collect(events)
        return CompletionResponse(
            id=response_id,
            created=created,
            model=self.backend.model_name,
            choices=[CompletionChoice(text=text, finish_reason=done.finish_reason)],
            usage=done.usage,
            coop=done.extras,
        )

    # -- validation -------------------------------------------------------------------------

    def _check_common(self, request: GenerationRequest) -> None:
        if request.model is not None and request.model != self.backend.model_name:
            raise RequestError(
                f"model {request.model!r} is not served here; this server serves {self.backend.model_name!r} "
                "(see GET /v1/models)",
                status=404,
                code="model_not_found",
                param="model",
            )
        if request.n not in (None, 1):
            raise RequestError(
                f"n={request.n} is not supported: this server returns exactly one choice per request",
                code="unsupported_value",
                param="n",
            )

    def _completion_prompt(self, request: CompletionRequest) -> list[int]:
        prompt = request.prompt
        texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
        if texts:
            if len(texts) != 1:
                raise RequestError(
                    f"prompt has {len(texts)} strings; batched prompts are not supported, send one",
                    param="prompt",
                )
            if not texts[0]:
                raise RequestError("prompt must not be empty", param="prompt")
            return self.backend.client.encode(texts[0])
        ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("prompt must not be empty", param="prompt")
        vocab = self.backend.client.manifest.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return ids

    def _sampling_params(self, request: GenerationRequest, prompt_tokens: int, default_max: int) -> SamplingParams:
        limit = self.backend.max_context
        room = limit - prompt_tokens
        requested = request.requested_max_tokens
        if requested is None:
            if room < 1:
                raise RequestError(
                    f"this model's maximum context length is {limit} tokens and the prompt has {prompt_tokens}, "
                    "which leaves no room for a completion; shorten the prompt",
                    code="context_length_exceeded",
                    param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
                )
            max_tokens = min(default_max, room)
        elif requested > room:
            raise RequestError(
                f"this model's maximum context length is {limit} tokens, but the prompt has {prompt_tokens} tokens "
                f"and max_tokens asks for {requested} ({prompt_tokens + requested} in total); "
                "shorten the prompt or lower max_tokens",
                code="context_length_exceeded",
                param="max_tokens",
            )
        else:
            max_tokens = requested
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=max(0, request.top_k or 0),
                seed=request.seed,
                stop=request.stop_sequences,
            )
        except ValidationError as exc:
            raise RequestError(f"invalid sampling parameters: {exc}") from exc


def _message_dict(message: ChatMessage, index: int) -> dict[str, Any]:
    """A request message -> what the chat template expects: role and plain-text content."""
    content = message.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts: list[str] = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise RequestError(
                    f"messages[{index}] has a {part.type!r} content part; only text is supported",
                    param=f"messages.{index}.content",
                )
            texts.append(part.text)
        text = "".join(texts)
    role = "system" if message.role == "developer" else message.role  # OpenAI's newer name for system
    return {"role": role, "content": text}


# -- streaming --------------------------------------------------------------------------------


async def _start_stream(events: AsyncGenerator[GenerationEvent, None], render: Render) -> AsyncIterator[str]:
    """Open the chain before the response starts, so validation and routing errors keep their
    HTTP status; later failures go into the stream as an error event."""
    first = await anext(events)
    return _sse(first, events, render)


async def _sse(
    first: GenerationEvent, events: AsyncGenerator[GenerationEvent, None], render: Render
) -> AsyncIterator[str]:
    try:
        for chunk in render(first):
            yield _data(chunk)
        async for event in events:
            for chunk in render(event):
                yield _data(chunk)
    except Exception as exc:
        _, envelope = error_response(exc)
        yield _data(envelope)
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"


def _data(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _chat_renderer(response_id: str, created: int, model: str, include_usage: bool) -> Render:

    def render(event: GenerationEvent) -> list[BaseModel]:
        def chunk(delta: DeltaMessage, finish: FinishReason | None = None, **extra: Any) -> ChatCompletionChunk:
            choice = ChatChunkChoice(delta=delta, finish_reason=finish)
            return ChatCompletionChunk(id=response_id, created=created, model=model, choices=[choice], **extra)

        if isinstance(event, Started):
            return [chunk(DeltaMessage(role="assistant", content=""))]
        if isinstance(event, TextDelta):
            return [chunk(DeltaMessage(content=event.text))]
        chunks: list[BaseModel] = [chunk(DeltaMessage(), event.finish_reason, coop=event.extras)]
        if include_usage:
            chunks.append(
                ChatCompletionChunk(id=response_id, created=created, model=model, choices=[], usage=event.usage)
            )
        return chunks

    return render


def _completion_renderer(response_id: str, created: int, model: str, include_usage: bool) -> Render:

    def render(event: GenerationEvent) -> list[BaseModel]:
        def chunk(choices: list[CompletionChoice], **extra: Any) -> CompletionChunk:
            return CompletionChunk(id=response_id, created=created, model=model, choices=choices, **extra)

        if isinstance(event, Started):
            return []
        if isinstance(event, TextDelta):
            return [chunk([CompletionChoice(text=event.text)])]
        chunks: list[BaseModel] = [
            chunk([CompletionChoice(text="", finish_reason=event.finish_reason)], coop=event.extras)
        ]
        if include_usage:
            chunks.append(chunk([], usage=event.usage))
        return chunks

    return render
