"""Every error, whatever its origin, as OpenAI's error envelope with its HTTP status: in one place."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from coop.coordinator.protocol import (
    ErrorInfo,
    ErrorResponse,
)
from coop.errors import (
    CacheBudgetExceeded,
    CoopError,
    CreditExhausted,
    InvalidInput,
    PeerError,
    RouteUnavailable,
)

log = logging.getLogger(__name__)


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
    CreditExhausted: (402, "insufficient_quota", "credit_exhausted"),
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
