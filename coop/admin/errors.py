"""Errors leave the admin view in one place each: pages answer with a page, the API with an envelope.

A page without a session redirects to the sign-in form; an API call without one gets 401. Both
carry the security headers. The coordinator's own exception handlers are not involved, so the
admin view behaves the same in whichever app it is mounted.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute

from coop.admin.rendering import render, with_security_headers
from coop.errors import (
    CoopError,
    CsrfRejected,
    InvalidInput,
    LedgerError,
    NotFound,
    SignInRequired,
    SignInThrottled,
    Unauthorized,
)

LOGIN_PATH = "/admin/login"


def _status(exc: Exception) -> int:
    if isinstance(exc, SignInRequired):
        return 401
    if isinstance(exc, SignInThrottled):
        return 429
    if isinstance(exc, Unauthorized):
        return 403
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, InvalidInput | RequestValidationError):
        return 400
    return 503  # the ledger or the pool directory failed: worth a retry


def _message(exc: Exception) -> str:
    if isinstance(exc, RequestValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
    return str(exc)


_HANDLED = (CoopError, RequestValidationError)


class AdminPageRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignInRequired:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                response = RedirectResponse(f"{LOGIN_PATH}?next={quote(target, safe='')}", status_code=303)
            except _HANDLED as exc:
                response = render("error.html", status_code=_status(exc), session=None, message=_message(exc))
            return with_security_headers(response)

        return page


def error_json(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "unauthorized" if status in (401, 403, 429) else "invalid_request_error" if status == 400 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="coop-admin"'
    return JSONResponse(body, status_code=status, headers=headers)


class AdminApiRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def api(request: Request) -> Response:
            try:
                response = await handler(request)
            except _HANDLED as exc:
                codes: dict[type[Exception], str] = {
                    SignInRequired: "admin_sign_in_required",
                    CsrfRejected: "csrf_token_invalid",
                    LedgerError: "ledger_unavailable",
                    NotFound: "not_found",
                    SignInThrottled: "sign_in_throttled",
                }
                code = codes.get(type(exc), "invalid_request")
                retry = {"Retry-After": f"{exc.retry_after_s:.0f}"} if isinstance(exc, SignInThrottled) else None
                response = error_json(_status(exc), _message(exc), code, retry)
            return with_security_headers(response)

        return api
