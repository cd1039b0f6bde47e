"""The logic behind the OpenAI-compatible endpoints, free of HTTP details.

A request becomes prompt ids (the chat template for chat) and `SamplingParams`; the decoding
loop runs over a chain the backend opens for this request alone and always closes; the token
stream becomes text through an incremental detokeniser that applies stop sequences. Streamed and
non-streamed responses are built from the same events, so their text is identical by
construction. Tokenizing and detokenizing run in worker threads (`TextWorkers`), bounded by the
request limits (`HttpLimits`) that the routes check first.

Errors of every origin become OpenAI's error envelope in one place: `api_errors.error_response`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from coop.coordinator.catalog import ModelCatalog, ServedModel
from coop.coordinator.http.api_errors import error_response
from coop.coordinator.http.limits import HttpLimits
from coop.coordinator.http.metrics import CoordinatorMetrics
from coop.coordinator.http.protocol import (
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
    DeltaMessage,
    FinishReason,
    GenerationRequest,
    HealthResponse,
    ModelCard,
    ModelCoverage,
    ModelList,
)
from coop.coordinator.http.text_stream import (
    Finished,
    GenerationEvent,
    Started,
    TextDelta,
    TextWorkers,
    collect_text,
    run_generation,
)
from coop.errors import RequestError
from coop.pipeline.backend import Backend
from coop.pipeline.charge import UNMETERED, Charge
from coop.pipeline.sampling import SamplingParams, with_defaults

log = logging.getLogger(__name__)

Render = Callable[[GenerationEvent], list[BaseModel]]
R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True)
class _Reply(Generic[R]):
    """How one endpoint (chat or text completion) names, streams and answers a generation."""

    id_prefix: str
    default_max_tokens: int
    renderer: Callable[[str, int, str, bool], Render]
    response: type[R]
    choice: Callable[[str, Finished], BaseModel]


# When the request names no max_tokens. Every session reserves KV cache for prompt + max_tokens
# on each node of its route, so "the rest of the context" (vLLM's default) would be costly.
DEFAULT_CHAT_MAX_TOKENS = 512
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class OpenAIServing:
    """One instance per app; holds nothing per request. Each request runs on the model it names."""

    def __init__(self, models: ModelCatalog, limits: HttpLimits, metrics: CoordinatorMetrics | None = None) -> None:
        self.catalog = models
        self.limits = limits
        self.metrics = metrics or CoordinatorMetrics()
        self.text = TextWorkers(limits.text_workers)
        self.created = int(time.time())

    def health(self) -> HealthResponse:
        return HealthResponse(model=self.catalog.default.name)

    def models(self) -> ModelList:
        """Every model served, covered or not: `coop` says which (OpenAI clients ignore the field)."""
        cards = []
        for model in self.catalog:
            coverage = model.coverage()
            cards.append(
                ModelCard(
                    id=model.name,
                    created=self.created,
                    max_model_len=model.backend.max_context,
                    sampling_defaults=model.backend.client.manifest.sampling_defaults,
                    coop=ModelCoverage(
                        covered=coverage.covered,
                        coverage=round(coverage.fraction, 4),
                        num_blocks=coverage.num_blocks,
                        missing_blocks=coverage.missing_blocks,
                        default=model is self.catalog.default,
                    ),
                )
            )
        return ModelList(data=cards)

    async def chat(
        self, request: ChatCompletionRequest, charge: Charge = UNMETERED
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """`charge`: who pays for the compute, as admission decided."""
        model = self._check_common(request)
        backend = model.backend
        if not request.messages:
            raise RequestError("messages must not be empty", param="messages")
        messages = [_message_dict(m, i) for i, m in enumerate(request.messages)]
        prompt_ids = await self.text.run(backend.client.encode_chat, messages)
        self.limits.check_prompt_tokens(len(prompt_ids), "messages")

        def choice(text: str, done: Finished) -> ChatChoice:
            return ChatChoice(message=AssistantMessage(content=text), finish_reason=done.finish_reason)

        reply = _Reply("chatcmpl", DEFAULT_CHAT_MAX_TOKENS, _chat_renderer, ChatCompletionResponse, choice)
        return await self._generate(model, request, prompt_ids, charge, reply)

    async def complete(
        self, request: CompletionRequest, charge: Charge = UNMETERED
    ) -> CompletionResponse | AsyncIterator[str]:
        model = self._check_common(request)
        backend = model.backend
        prompt_ids = await self._completion_prompt(backend, request)
        self.limits.check_prompt_tokens(len(prompt_ids), "prompt")

        def choice(text: str, done: Finished) -> CompletionChoice:
            return CompletionChoice(text=text, finish_reason=done.finish_reason)

        reply = _Reply("cmpl", DEFAULT_COMPLETION_MAX_TOKENS, _completion_renderer, CompletionResponse, choice)
        return await self._generate(model, request, prompt_ids, charge, reply)

    async def _generate(
        self, model: ServedModel, request: GenerationRequest, prompt_ids: list[int], charge: Charge, reply: _Reply[R]
    ) -> R | AsyncIterator[str]:
        """Run the decoding loop for an admitted, tokenized request: a stream of chunks or one response."""
        backend = model.backend
        params = self._sampling_params(backend, request, len(prompt_ids), reply.default_max_tokens)
        await model.require_covered()
        response_id, created = f"{reply.id_prefix}-{uuid.uuid4().hex}", int(time.time())
        events = self.metrics.timed(run_generation(backend, self.text, prompt_ids, params, charge))
        if request.stream:
            render = reply.renderer(response_id, created, backend.model_name, request.include_usage)
            return await _start_stream(events, render)
        text, done = await collect_text(events)
        return reply.response(
            id=response_id,
            created=created,
            model=backend.model_name,
            choices=[reply.choice(text, done)],
            usage=done.usage,
            coop=done.extras,
        )

    # -- validation -------------------------------------------------------------------------

    def _check_common(self, request: GenerationRequest) -> ServedModel:
        """The model the request names (model_not_found if it is not served), once `n` is checked too."""
        model = self.catalog.get(request.model)
        if request.n not in (None, 1):
            raise RequestError(
                f"n={request.n} is not supported: this server returns exactly one choice per request",
                code="unsupported_value",
                param="n",
            )
        return model

    async def _completion_prompt(self, backend: Backend, request: CompletionRequest) -> list[int]:
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
            return await self.text.run(backend.client.encode, texts[0])
        ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("prompt must not be empty", param="prompt")
        vocab = backend.client.manifest.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return ids

    def _sampling_params(
        self, backend: Backend, request: GenerationRequest, prompt_tokens: int, default_max: int
    ) -> SamplingParams:
        limit = backend.max_context
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
            return with_defaults(
                backend.client.manifest.sampling_defaults,
                max_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=None if request.top_k is None else max(0, request.top_k),  # -1 and 0: no limit
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
