"""Wire shapes of the OpenAI-compatible API: requests, responses, stream chunks, errors.

Requests ignore fields they do not know: OpenAI clients send extras (logprobs, penalties,
metadata, ...) and refusing them would break those clients for no gain. Responses carry one
non-standard field, `coop`, with the generated token ids, the route and the sampling used, which
OpenAI clients ignore. A sampling parameter a request leaves unset (absent or null) takes the
model's recommended value (`sampling_defaults` in /v1/models), else OpenAI's default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from coop.model.manifest import SamplingDefaults


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- requests ---------------------------------------------------------------------------------


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class GenerationRequest(_Request):
    """Fields shared by chat and text completions."""

    model: str | None = None  # None: the one model this server serves
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # None (absent, or null from some clients): the model's recommendation, else OpenAI's default
    # (temperature 1, top_p 1, no top_k). Temperature 0 = greedy.
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # extension (vLLM's); 0 or -1 = no limit
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None  # only 1 is supported
    user: str | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage]


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int]


# -- responses --------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RouteHop(BaseModel):
    """One hop of the route a response took: which node ran which blocks."""

    node_id: str
    institution: str = ""
    endpoint: str
    start: int
    end: int
    failovers: int  # of the whole session: how many times it moved to another route


class SamplingUsed(BaseModel):
    """The sampling a response was generated with: the request's values, defaults filled in."""

    temperature: float
    top_p: float
    top_k: int  # 0 = no limit
    seed: int | None


class CoopExtras(BaseModel):
    """Non-standard diagnostics: the exact token ids (for comparisons), the route taken, the sampling used."""

    token_ids: list[int]
    route: list[RouteHop]
    sampling: SamplingUsed


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    coop: CoopExtras


def _absent(value: object) -> bool:
    return value is None


class DeltaMessage(BaseModel):
    """Absent fields are left out, as in OpenAI's chunks (the last delta is `{}`)."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_absent)
    content: str | None = Field(default=None, exclude_if=_absent)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=_absent)  # only on the last chunk, when asked for
    coop: CoopExtras | None = Field(default=None, exclude_if=_absent)  # only with the finish_reason


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    coop: CoopExtras


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_absent)
    coop: CoopExtras | None = Field(default=None, exclude_if=_absent)


class ModelCoverage(BaseModel):
    """Whether serving nodes hold every block of a model now; requests for an uncovered one get 503."""

    covered: bool
    coverage: float  # share of the model's blocks some serving node holds, in [0, 1]
    num_blocks: int
    missing_blocks: list[tuple[int, int]]  # runs [start, end) no serving node holds
    default: bool  # the model a request that names none gets


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "coop"
    max_model_len: int
    sampling_defaults: SamplingDefaults  # what a request that sets no sampling parameter gets
    coop: ModelCoverage


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model: str


# -- the chain relay (the SDK's research sessions, coop.coordinator.http.relay) --------------------


class RelayOpenRequest(_Request):
    max_length: int = Field(ge=1)  # tokens the session may step in all: the KV cache each node reserves
    model_hash: str  # the content hash of the caller's prepared model: its embeddings must be ours


class RelaySessionInfo(BaseModel):
    """A relay session: where it stands and the route it runs on now."""

    session_id: str
    model: str
    max_length: int
    position: int  # tokens stepped so far: the start_position of the next step
    failovers: int
    route: list[RouteHop]


# -- errors -----------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo
