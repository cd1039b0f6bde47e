"""The coordinator's OpenAI-compatible HTTP API: routes and HTTP plumbing only.

What a request means lives in `coop.coordinator.serving` (and, for the SDK's research sessions
under /v1/coop/sessions, `coop.coordinator.relay`); the shapes on the wire in
`coop.coordinator.protocol`. Every error, ours or the framework's, leaves through
`api_errors.error_response`, so clients always get OpenAI's error envelope.
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from coop.config import DEFAULT_SESSION_IDLE_TIMEOUT_S
from coop.coordinator.admission import RequestAdmission, enter_request
from coop.coordinator.api_errors import error_response
from coop.coordinator.auth import ApiKeyGate, Caller
from coop.coordinator.protocol import ChatCompletionRequest, CompletionRequest, RelayOpenRequest
from coop.coordinator.relay import ChainRelay
from coop.coordinator.serving import OpenAIServing
from coop.errors import CoopError, RequestError
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
    work: Callable[[Charge], Awaitable[BaseModel | AsyncIterator[str]]],
) -> Response:
    """Run a generation while holding one of the caller's key slots and, when the pool meters use,
    a session slot granted in fair-share order; a stream keeps both until it ends."""
    stack = AsyncExitStack()
    try:
        charge, waited_s = await enter_request(stack, gate, access, caller)
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


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) once it is known to exceed limit bytes: before reading any of it
    when it declares its length, else as soon as the bytes read pass the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(
        f"the body has {size:,} bytes or more, over the {limit:,} this session can take now; "
        "send fewer tokens per step, or check the tensor's dtype and shape",
        status=413,
        code="request_too_large",
    )


async def _handle_error(request: Request, exc: Exception) -> Response:
    status, envelope = error_response(exc)
    return JSONResponse(envelope.model_dump(mode="json"), status_code=status)


def create_app(
    backend: Backend,
    *,
    keys: ApiKeyGate | None = None,
    access: RequestAdmission | None = None,
    session_idle_timeout_s: float = DEFAULT_SESSION_IDLE_TIMEOUT_S,
) -> FastAPI:
    """`keys`: the API-key gate; None serves anyone (development mode). `access`: credit floors and
    fair-share admission (None: every request starts at once). `session_idle_timeout_s`: relay
    sessions idle this long are closed."""
    serving = OpenAIServing(backend)
    gate = keys or ApiKeyGate(None)
    relay = ChainRelay(backend, gate, access, idle_timeout_s=session_idle_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await relay.aclose()

    def caller(authorization: Annotated[str | None, Header()] = None) -> Caller:
        return gate.identify(authorization)

    Authenticated = Annotated[Caller, Depends(caller)]
    app = FastAPI(title="Coop coordinator", summary="OpenAI-compatible API over a cooperative pool", lifespan=lifespan)
    for exc_type in (CoopError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_type, _handle_error)

    @app.get("/health")
    async def health() -> Response:
        return _respond(serving.health())

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models(who: Authenticated) -> Response:
        return _respond(serving.models())

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, who: Authenticated) -> Response:
        gate.check_max_tokens(who, body.requested_max_tokens)
        return await _generate(gate, access, who, lambda charge: serving.chat(body, charge))

    @v1.post("/completions")
    async def completions(body: CompletionRequest, who: Authenticated) -> Response:
        gate.check_max_tokens(who, body.requested_max_tokens)
        return await _generate(gate, access, who, lambda charge: serving.complete(body, charge))

    sessions = APIRouter(prefix="/v1/coop/sessions")

    @sessions.post("")
    async def open_session(body: RelayOpenRequest, who: Authenticated) -> Response:
        return _respond(await relay.open(who, body))

    @sessions.get("/{session_id}")
    async def describe_session(session_id: str, who: Authenticated) -> Response:
        return _respond(relay.describe(relay.session(who, session_id)))

    @sessions.post("/{session_id}/steps", openapi_extra=_BINARY_STEP)
    async def step_session(session_id: str, request: Request, who: Authenticated) -> Response:
        session = relay.session(who, session_id)
        body = await _read_body(request, relay.body_limit(session))
        return Response(await relay.step(session, body), media_type=BINARY)

    @sessions.delete("/{session_id}", status_code=204)
    async def close_session(session_id: str, who: Authenticated) -> Response:
        await relay.close(who, session_id)
        return Response(status_code=204)

    app.include_router(v1)
    app.include_router(sessions)
    app.state.serving = serving
    app.state.relay = relay
    return app
