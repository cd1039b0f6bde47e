"""The coordinator's OpenAI-compatible HTTP API: routes and HTTP plumbing only.

What a request means lives in `coop.coordinator.serving`; the shapes on the wire in
`coop.coordinator.protocol`. Every error, ours or the framework's, leaves through
`api_errors.error_response`, so clients always get OpenAI's error envelope.
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from coop.coordinator.admission import RequestAdmission
from coop.coordinator.api_errors import error_response
from coop.coordinator.auth import ApiKeyGate, Caller
from coop.coordinator.protocol import ChatCompletionRequest, CompletionRequest
from coop.coordinator.serving import OpenAIServing
from coop.errors import CoopError
from coop.pipeline.backend import Backend
from coop.pipeline.charge import Charge
from coop.receipts import api_key_id


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
    stack.enter_context(gate.slot(caller))
    charge, waited_s = Charge(caller.institution or ""), None
    try:
        if access is not None:
            key_id = api_key_id(caller.key_digest) if caller.key_digest else ""
            admitted = await stack.enter_async_context(access.enter(caller.institution, key_id))
            charge, waited_s = admitted.charge, admitted.waited_s
        result = await work(charge)
    except BaseException:
        await stack.aclose()
        raise
    if isinstance(result, BaseModel):
        await stack.aclose()
        return _respond(result, waited_s)
    return _respond(result, waited_s, cleanup=stack)  # the response gives the slots back when it ends


async def _handle_error(request: Request, exc: Exception) -> Response:
    status, envelope = error_response(exc)
    return JSONResponse(envelope.model_dump(mode="json"), status_code=status)


def create_app(backend: Backend, *, keys: ApiKeyGate | None = None, access: RequestAdmission | None = None) -> FastAPI:
    """`keys`: the API-key gate; None serves anyone (development mode). `access`: credit floors and
    fair-share admission (None: every request starts at once)."""
    serving = OpenAIServing(backend)
    gate = keys or ApiKeyGate(None)

    def caller(authorization: Annotated[str | None, Header()] = None) -> Caller:
        return gate.identify(authorization)

    Authenticated = Annotated[Caller, Depends(caller)]
    app = FastAPI(title="Coop coordinator", summary="OpenAI-compatible API over a cooperative pool")
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

    app.include_router(v1)
    app.state.serving = serving
    return app
