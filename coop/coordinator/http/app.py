"""The coordinator's OpenAI-compatible HTTP API: routes and HTTP plumbing only.

What a request means lives in `coop.coordinator.http.serving` (and, for the SDK's research sessions
under /v1/coop/sessions, `coop.coordinator.http.relay`); the shapes on the wire in
`coop.coordinator.http.protocol`. Every error, ours or the framework's, leaves through
`api_errors.error_response`, so clients always get OpenAI's error envelope. Before any route, the
API key and the body's size are checked (`coop.coordinator.http.guard`); every refusal is counted by its
code in `app.state.rejections`. `/metrics` serves Prometheus (`coop.coordinator.http.metrics`), without an
API key: to anyone who can reach the API, or only with the bearer token of `metrics_token`.
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, SecretStr
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from coop.config import DEFAULT_SESSION_IDLE_TIMEOUT_S
from coop.coordinator.accounts.fair_share_admission import RequestAdmission
from coop.coordinator.catalog import ModelCatalog
from coop.coordinator.http.api_errors import error_response
from coop.coordinator.http.auth import ApiKeyGate, Caller
from coop.coordinator.http.guard import RequestGuard
from coop.coordinator.http.limits import HttpLimits, Rejections
from coop.coordinator.http.metrics import CoordinatorMetrics, RequestCounter
from coop.coordinator.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    RelayOpenRequest,
)
from coop.coordinator.http.relay import ChainRelay
from coop.coordinator.http.request_slots import enter_request
from coop.coordinator.http.serving import OpenAIServing
from coop.errors import CoopError
from coop.pipeline.backend import Backend
from coop.pipeline.charge import Charge


class _ClosingStreamingResponse(StreamingResponse):
    """Closes the body iterator however the response ends (e.g. the client hung up, even before the
    first byte), so the request's chain is released now rather than whenever the garbage collector
    gets to it; then gives back the request's slots (`cleanup`)."""

    def __init__(self, content: AsyncIterator[str], cleanup: AsyncExitStack, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self.cleanup.aclose()


# Seconds the request waited for a session slot: 0 on a pool with room, more when it is saturated.
QUEUE_HEADER = "X-Coop-Queue-Seconds"


def _respond(
    result: BaseModel | AsyncIterator[str], waited_s: float | None = None, cleanup: AsyncExitStack | None = None
) -> Response:
    headers = {} if waited_s is None else {QUEUE_HEADER: f"{waited_s:.3f}"}
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"), headers=headers)
    headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return _ClosingStreamingResponse(
        result, cleanup or AsyncExitStack(), media_type="text/event-stream", headers=headers
    )


async def _generate(
    gate: ApiKeyGate,
    access: RequestAdmission | None,
    caller: Caller,
    model_hash: str,
    work: Callable[[Charge], Awaitable[BaseModel | AsyncIterator[str]]],
    metrics: CoordinatorMetrics,
) -> Response:
    """Run a generation while holding one of the caller's key slots and, when the pool meters use,
    a session slot granted in fair-share order; a stream keeps both until it ends."""
    stack = AsyncExitStack()
    try:
        charge, waited_s = await enter_request(stack, gate, access, caller, model_hash)
        if waited_s is not None:
            metrics.queue_wait.observe(waited_s)
        result = await work(charge)
    except BaseException:
        await stack.aclose()
        raise
    if isinstance(result, BaseModel):
        await stack.aclose()
        return _respond(result, waited_s)
    return _respond(result, waited_s, cleanup=stack)  # the response gives the slots back when it ends


# The body of a relay step and of its answer: a serialized protobuf message (coop.v1.RelayStep, coop.v1.Tensor).
BINARY = "application/octet-stream"
_BINARY_CONTENT = {"content": {BINARY: {"schema": {"type": "string", "format": "binary"}}}}
_BINARY_STEP: dict[str, Any] = {
    "requestBody": {"required": True, "description": "a serialized coop.v1.RelayStep", **_BINARY_CONTENT},
    "responses": {
        "200": {"description": "a serialized coop.v1.Tensor: the states after the last block", **_BINARY_CONTENT}
    },
}


SESSIONS_PREFIX = "/v1/coop/sessions"
STEPS_SUFFIX = "/steps"  # of a relay session's path: its body is hidden states, with a limit of its own


def create_app(
    served: Backend | ModelCatalog,
    *,
    keys: ApiKeyGate | None = None,
    access: RequestAdmission | None = None,
    session_idle_timeout_s: float = DEFAULT_SESSION_IDLE_TIMEOUT_S,
    limits: HttpLimits | None = None,
    public_docs: bool = True,
    metrics: CoordinatorMetrics | None = None,
    metrics_token: SecretStr | None = None,
) -> FastAPI:
    """`served`: what the API serves, by the request's "model" (one backend: that model alone); the
    SDK's relay sessions by the model's content hash. `keys`: the API-key gate; None serves anyone
    (development mode). `access`: credit floors and fair-share admission (None: every request starts
    at once). `session_idle_timeout_s`: relay sessions idle this long are closed. `limits`: what one
    request may send (default: the settings' defaults). `public_docs`: serve /docs, /redoc and
    /openapi.json to anyone. `metrics`: where requests are counted and timed (default: a registry of
    this app's own); `metrics_token`: the bearer token /metrics asks for (None: none)."""
    limits = limits or HttpLimits()
    metrics = metrics or CoordinatorMetrics()
    catalog = served if isinstance(served, ModelCatalog) else ModelCatalog.single(served)
    serving = OpenAIServing(catalog, limits, metrics)
    gate = keys or ApiKeyGate(None)
    relay = ChainRelay(
        catalog,
        gate,
        access,
        idle_timeout_s=session_idle_timeout_s,
        max_tokens_per_institution=limits.max_relay_tokens_per_institution,
    )
    rejections = Rejections()
    metrics.watch(rejections, access.admission if access is not None else None)

    def body_limit(path: str) -> int:
        if path.startswith(SESSIONS_PREFIX) and path.endswith(STEPS_SUFFIX):
            return max(relay.largest_body(), limits.max_request_bytes)
        return limits.max_request_bytes

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await relay.aclose()

    docs: dict[str, Any] = {} if public_docs else {"openapi_url": None, "docs_url": None, "redoc_url": None}
    app = FastAPI(
        title="Coop coordinator",
        summary="OpenAI-compatible API over a cooperative pool",
        lifespan=lifespan,
        **docs,
    )
    handle_error = _error_handler(rejections)
    for exc_type in (CoopError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_type, handle_error)
    app.add_middleware(RequestGuard, gate=gate, body_limit=body_limit, rejections=rejections)
    app.add_middleware(RequestCounter, requests=metrics.http_requests)  # outermost: counts the guard's refusals too
    app.include_router(_service_routes(serving, metrics, metrics_token))
    app.include_router(_generation_routes(serving, gate, access, limits, metrics))
    app.include_router(_relay_routes(relay))
    app.state.serving = serving
    app.state.relay = relay
    app.state.rejections = rejections
    app.state.metrics = metrics
    return app


def _error_handler(rejections: Rejections) -> Callable[[Request, Exception], Awaitable[Response]]:
    """Every error, ours or the framework's, as OpenAI's envelope; a client's (4xx) counted by its code."""

    async def handle_error(request: Request, exc: Exception) -> Response:
        status, envelope = error_response(exc)
        if 400 <= status < 500:
            rejections.record(envelope.error.code or f"http_{status}")
        return JSONResponse(envelope.model_dump(mode="json"), status_code=status)

    return handle_error


def _caller(request: Request) -> Caller:
    """Who the guard found the request to come from, before its body was read."""
    found: Caller = request.state.caller
    return found


Authenticated = Annotated[Caller, Depends(_caller)]


def _service_routes(serving: OpenAIServing, metrics: CoordinatorMetrics, metrics_token: SecretStr | None) -> APIRouter:
    """/health and Prometheus' /metrics: no API key."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        return _respond(serving.health())

    @router.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        body = metrics.exposition(request.headers.get("authorization"), metrics_token)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router


def _generation_routes(
    serving: OpenAIServing,
    gate: ApiKeyGate,
    access: RequestAdmission | None,
    limits: HttpLimits,
    metrics: CoordinatorMetrics,
) -> APIRouter:
    """OpenAI's /v1/models, /v1/chat/completions and /v1/completions."""
    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models(who: Authenticated) -> Response:
        return _respond(serving.models())

    async def checked_generate(
        body: GenerationRequest, who: Caller, work: Callable[[Charge], Awaitable[BaseModel | AsyncIterator[str]]]
    ) -> Response:
        """Refuse a request over the caller's or the server's limits before it waits for a slot."""
        gate.check_max_tokens(who, body.requested_max_tokens)
        limits.check(body)
        model_hash = serving.catalog.get(body.model).model_hash
        return await _generate(gate, access, who, model_hash, work, metrics)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, who: Authenticated) -> Response:
        return await checked_generate(body, who, lambda charge: serving.chat(body, charge))

    @v1.post("/completions")
    async def completions(body: CompletionRequest, who: Authenticated) -> Response:
        return await checked_generate(body, who, lambda charge: serving.complete(body, charge))

    return v1


def _relay_routes(relay: ChainRelay) -> APIRouter:
    """The SDK's relay sessions under /v1/coop/sessions."""
    sessions = APIRouter(prefix=SESSIONS_PREFIX)

    @sessions.post("")
    async def open_session(body: RelayOpenRequest, who: Authenticated) -> Response:
        return _respond(await relay.open(who, body))

    @sessions.get("/{session_id}")
    async def describe_session(session_id: str, who: Authenticated) -> Response:
        return _respond(relay.describe(relay.session(who, session_id)))

    @sessions.post("/{session_id}" + STEPS_SUFFIX, openapi_extra=_BINARY_STEP)
    async def step_session(session_id: str, request: Request, who: Authenticated) -> Response:
        session = relay.session(who, session_id)
        return Response(await relay.step(session, await request.body()), media_type=BINARY)

    @sessions.delete("/{session_id}", status_code=204)
    async def close_session(session_id: str, who: Authenticated) -> Response:
        await relay.close(who, session_id)
        return Response(status_code=204)

    return sessions
