"""The coordinator's door: who is asking and how much they send, settled before a body is parsed.

An ASGI middleware in front of every route. Under /v1 the API key is checked from the headers
alone, so a request without a valid key costs a hash and a dictionary lookup whatever its body
(401 even for a malformed or huge one). Then the body is read, up to a limit: one that declares a
larger Content-Length is refused (413) before any of it is read, a chunked one as soon as the
bytes read pass the limit. Only then does the app see the request, with the body replayed to it
and the caller in `request.state.caller`.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coop.coordinator.http.api_errors import error_response
from coop.coordinator.http.auth import ApiKeyGate
from coop.coordinator.http.limits import Rejections
from coop.errors import RequestError, RequestTooLarge

KEYED_PREFIX = "/v1/"  # what needs an API key (when the coordinator has a key file)


class RequestGuard:
    def __init__(
        self, app: ASGIApp, *, gate: ApiKeyGate, body_limit: Callable[[str], int], rejections: Rejections
    ) -> None:
        """`body_limit`: path -> the most bytes a body sent there may have."""
        self.app = app
        self.gate = gate
        self.body_limit = body_limit
        self.rejections = rejections

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if scope["path"].startswith(KEYED_PREFIX):
                caller = self.gate.identify(_header(scope, b"authorization"))
                scope.setdefault("state", {})["caller"] = caller
            body = await _read_body(scope, receive, self.body_limit(scope["path"]))
        except RequestError as exc:
            await self._refuse(exc, scope, receive, send)
            return
        if body is None:  # the client went away while sending
            return
        await self.app(scope, _replay(body, receive), send)

    async def _refuse(self, exc: RequestError, scope: Scope, receive: Receive, send: Send) -> None:
        status, envelope = error_response(exc)
        self.rejections.record(envelope.error.code or f"http_{status}")
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        await JSONResponse(envelope.model_dump(mode="json"), status_code=status, headers=headers)(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body, or RequestTooLarge once it is known to pass `limit`; None if the client left."""
    declared = _header(scope, b"content-length") or ""
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(size: int, limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"the request body has {size:,} bytes or more; this coordinator takes at most {limit:,}")


def _replay(body: bytes, receive: Receive) -> Receive:
    """The app's receive: the body read already, then the client's own messages (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
