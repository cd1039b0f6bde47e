"""Every error, whatever its origin, as OpenAI's error envelope with its HTTP status: in one place."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from coop import errors
from coop.coordinator.http.protocol import (
    ErrorInfo,
    ErrorResponse,
)

log = logging.getLogger(__name__)

_BAD_REQUEST = "invalid_request_error"
_SERVER = "server_error"
_UNAVAILABLE = "service_unavailable_error"

# Every class of the `coop.errors` tree -> (HTTP status, OpenAI error type, code); a unit test
# fails when a class has no row of its own. 4xx: the client can fix the request. 502: the nodes
# (or the local engines) that run the model broke the session, which a retry on a fresh route
# may not meet again; a node's own errors arrive here as PeerError (see coop.pipeline.remote).
# 503: capacity, worth a retry. 500: the coordinator's own store or ledger failed.
ERROR_TABLE: dict[type[BaseException], tuple[int, str, str]] = {
    errors.CoopError: (500, _SERVER, "internal_error"),
    # the coordinator's prepared model: a broken install, not the request
    errors.ModelStoreError: (500, _SERVER, "model_store_error"),
    errors.ModelNotFound: (500, _SERVER, "model_store_error"),
    errors.ModelIntegrityError: (500, _SERVER, "model_store_error"),
    errors.UnsupportedModel: (500, _SERVER, "model_store_error"),
    # the session protocol between the coordinator and the engines: no client request can break it
    errors.SpanOutOfRange: (502, _SERVER, "span_out_of_range"),
    errors.SessionError: (502, _SERVER, "session_error"),
    errors.UnknownSession: (502, _SERVER, "unknown_session"),
    errors.SessionExists: (502, _SERVER, "session_exists"),
    errors.ReplayUnavailable: (502, _SERVER, "replay_unavailable"),
    errors.InvalidTensor: (502, _SERVER, "invalid_tensor"),  # the client sends text and token ids, never tensors
    errors.InvalidPositions: (502, _SERVER, "invalid_positions"),  # positions are the coordinator's to count
    # capacity, not a bug: the same request can succeed once other sessions finish
    errors.SessionLimitExceeded: (503, _UNAVAILABLE, "session_limit_exceeded"),
    errors.CacheBudgetExceeded: (503, _UNAVAILABLE, "capacity_exceeded"),
    errors.NodeDraining: (503, _UNAVAILABLE, "node_draining"),  # a node leaving: another route will serve
    errors.RouteUnavailable: (503, _UNAVAILABLE, "route_unavailable"),
    errors.PeerError: (502, _SERVER, "peer_error"),
    # the request itself
    errors.InvalidInput: (400, _BAD_REQUEST, "invalid_input"),
    errors.RequestError: (400, _BAD_REQUEST, "invalid_request"),  # each instance carries its own status and code
    errors.RequestTooLarge: (413, _BAD_REQUEST, "request_too_large"),
    errors.RequestLimitExceeded: (400, _BAD_REQUEST, "request_limit_exceeded"),
    errors.SignInThrottled: (429, _BAD_REQUEST, "sign_in_throttled"),
    errors.DialBackThrottled: (429, _BAD_REQUEST, "dial_back_throttled"),
    errors.NotFound: (404, _BAD_REQUEST, "not_found"),
    errors.Unauthorized: (401, _BAD_REQUEST, "unauthorized"),
    errors.SignInRequired: (401, _BAD_REQUEST, "admin_sign_in_required"),
    errors.CsrfRejected: (403, _BAD_REQUEST, "csrf_token_invalid"),
    errors.CreditExhausted: (402, "insufficient_quota", "credit_exhausted"),
    # the coordinator's ledger
    errors.LedgerError: (500, _SERVER, "ledger_error"),
    errors.ReceiptRejected: (500, _SERVER, "ledger_error"),
    errors.ReceiptPending: (503, _UNAVAILABLE, "receipt_pending"),
    # another coordinator's answer, should this one ever call one
    errors.ApiError: (502, _SERVER, "upstream_error"),
    # a node's limits (issue 12): capacity, a session the node closed, a session beyond the model's context
    errors.PeerCacheLimitExceeded: (503, _UNAVAILABLE, "capacity_exceeded"),
    errors.InFlightLimitExceeded: (503, _UNAVAILABLE, "capacity_exceeded"),
    errors.SessionDropped: (502, _SERVER, "unknown_session"),
    errors.ContextLengthExceeded: (400, _BAD_REQUEST, "context_length_exceeded"),
    # a process's own settings, refused at start: never a request's doing
    errors.InvalidSettings: (500, _SERVER, "invalid_settings"),
}


def error_response(exc: BaseException) -> tuple[int, ErrorResponse]:
    """Any exception -> (HTTP status, OpenAI error envelope). The API's only error mapping."""
    if isinstance(exc, errors.RequestError):
        kind = _BAD_REQUEST if exc.status < 500 else _SERVER
        return exc.status, _envelope(str(exc), kind, exc.code, exc.param)
    if isinstance(exc, RequestValidationError):
        message, param, code = _describe_validation_error(exc)
        return 400, _envelope(message, _BAD_REQUEST, code, param)
    if isinstance(exc, HTTPException):
        kind = _BAD_REQUEST if exc.status_code < 500 else _SERVER
        return exc.status_code, _envelope(str(exc.detail), kind, None, None)
    if isinstance(exc, errors.CoopError):
        status, kind, code = error_row(type(exc))
        if status == 500:  # our own fault: worth a traceback in the log
            log.error("%s while serving a request", type(exc).__name__, exc_info=exc)
        return status, _envelope(str(exc), kind, code, None)
    log.error("unexpected error while serving a request", exc_info=exc)
    message = f"internal error ({type(exc).__name__}); the coordinator's log has the details"
    return 500, _envelope(message, _SERVER, "internal_error", None)


def error_row(cls: type[errors.CoopError]) -> tuple[int, str, str]:
    """The table row of `cls`, or of its nearest ancestor that has one (CoopError at worst)."""
    for ancestor in cls.__mro__:
        if ancestor in ERROR_TABLE:
            return ERROR_TABLE[ancestor]
    return ERROR_TABLE[errors.CoopError]


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
