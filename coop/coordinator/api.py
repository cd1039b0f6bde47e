"""The coordinator's OpenAI-compatible HTTP API: routes and HTTP plumbing only.

What a request means lives in `coop.coordinator.serving`; the shapes on the wire in
`coop.coordinator.protocol`. Every error, ours or the framework's, leaves through
`api_errors.error_response`, so clients always get OpenAI's error envelope.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import Send

from coop.coordinator.api_errors import error_response
from coop.coordinator.backend import Backend
from coop.coordinator.protocol import ChatCompletionRequest, CompletionRequest
from coop.coordinator.serving import OpenAIServing
from coop.errors import CoopError


async def authenticate(authorization: Annotated[str | None, Header()] = None) -> str | None:
    """The caller's API key from `Authorization: Bearer KEY`, or None.

    The one place to enforce keys later: raise `api_errors.RequestError(..., status=401,
    code="invalid_api_key")` here (or swap it via `app.dependency_overrides[authenticate]`).
    Until then any header, or none, is accepted, as OpenAI clients insist on sending one.
    """
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else authorization


class _ClosingStreamingResponse(StreamingResponse):
    """Closes the body iterator however the response ends (e.g. the client hung up), so the
    request's chain is released now rather than whenever the garbage collector gets to it."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def _respond(result: BaseModel | AsyncIterator[str]) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return _ClosingStreamingResponse(result, media_type="text/event-stream", headers=headers)


async def _handle_error(request: Request, exc: Exception) -> Response:
    status, envelope = error_response(exc)
    return JSONResponse(envelope.model_dump(mode="json"), status_code=status)


def create_app(backend: Backend) -> FastAPI:
    serving = OpenAIServing(backend)
    app = FastAPI(title="Coop coordinator", summary="OpenAI-compatible API over a cooperative pool")
    for exc_type in (CoopError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_type, _handle_error)

    @app.get("/health")
    async def health() -> Response:
        return _respond(serving.health())

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)])

    @v1.get("/models")
    async def models() -> Response:
        return _respond(serving.models())

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return _respond(await serving.chat(body))

    @v1.post("/completions")
    async def completions(body: CompletionRequest) -> Response:
        return _respond(await serving.complete(body))

    app.include_router(v1)
    app.state.serving = serving
    return app
