"""The admin view's HTML pages and forms, under /admin. HTTP only: views.py reads, actions.py writes.

Every form posts the session's CSRF token; a change answers with a redirect to a page (so a reload
does not repeat it), except a new API key, which is shown once on the page that created it.
"""

import datetime as dt
import secrets
from collections.abc import Iterator
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from coop.admin import actions, export, views
from coop.admin.auth import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    LOGIN_TOKEN_TTL_S,
    SESSION_COOKIE,
    AdminAuth,
    AdminSession,
    tokens_match,
)
from coop.admin.context import AdminContext
from coop.admin.errors import AdminPageRoute
from coop.admin.queries import AuditFilter, ReceiptFilter
from coop.admin.rendering import read_form, render
from coop.errors import CsrfRejected, InvalidInput, SignInThrottled

PER_PAGE = 50
# Pages that show the live swarm are `async`: they copy it on the event loop that updates it, then
# read the ledger and the pool directory in a worker thread. The others are plain `def` (threads).


def _next_path(value: str | None) -> str:
    """Only a path inside the admin view: never an open redirect to another site."""
    if value and value.startswith("/admin") and not value.startswith("//") and "\\" not in value:
        return value
    return "/admin/"


def parse_day(value: str | None, what: str) -> dt.datetime | None:
    """'2025-01-31' or an ISO time (UTC unless it says otherwise); empty means no bound."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(f"{what} must be a date like 2025-01-31, got {value[:40]!r}") from exc
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed


def receipt_filter(
    institution: str | None = None,
    node: str | None = None,
    session_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> ReceiptFilter:
    return ReceiptFilter(
        institution=institution or None,
        node=node or None,
        session_id=session_id or None,
        since=parse_day(since, "since"),
        until=parse_day(until, "until"),
    )


def audit_filter(action: str | None = None, actor: str | None = None, subject: str | None = None) -> AuditFilter:
    return AuditFilter(action=action or None, actor=actor or None, subject=subject or None)


def pages_router(ctx: AdminContext, auth: AdminAuth) -> APIRouter:
    router = APIRouter(prefix="/admin", route_class=AdminPageRoute, include_in_schema=False)
    _add_sign_in_routes(router, ctx, auth)
    _add_view_routes(router, ctx, auth)
    _add_change_routes(router, ctx, auth)
    return router


def _page(
    auth: AdminAuth, template: str, session: AdminSession, *, status_code: int = 200, **context: Any
) -> HTMLResponse:
    """A page for a signed-in admin, with the messages flashed to the session since the last one."""
    flashes = auth.sessions.pop_flashes(session.session_id)
    return render(template, status_code=status_code, session=session, flashes=flashes, **context)


async def _checked_form(auth: AdminAuth, request: Request, session: AdminSession) -> dict[str, str]:
    form = await read_form(request)
    auth.require_csrf(session, form.get(CSRF_FIELD))
    return form


def _add_sign_in_routes(router: APIRouter, ctx: AdminContext, auth: AdminAuth) -> None:
    Session = Annotated[AdminSession, Depends(auth.session)]

    def login_form(
        request: Request, next_path: str, *, error: str | None = None, status_code: int | None = None
    ) -> HTMLResponse:
        token = secrets.token_urlsafe(32)
        status_code = status_code or (401 if error else 200)
        response = render("login.html", status_code=status_code, session=None, csrf=token, next=next_path, error=error)
        auth.set_cookie(request, response, LOGIN_COOKIE, token, LOGIN_TOKEN_TTL_S)
        return response

    @router.get("/login")
    def login(request: Request, next: str | None = None) -> Response:
        if auth.sessions.get(request.cookies.get(SESSION_COOKIE)) is not None:
            return RedirectResponse(_next_path(next), status_code=303)
        return login_form(request, _next_path(next))

    @router.post("/login")
    async def login_submit(request: Request) -> Response:
        form = await read_form(request)
        if not tokens_match(request.cookies.get(LOGIN_COOKIE, ""), form.get(CSRF_FIELD)):
            raise CsrfRejected("the sign-in form expired or did not come from this site: reload it and try again")
        next_path = _next_path(form.get("next"))
        client = auth.client(request)
        try:
            if not await run_in_threadpool(auth.sign_in, client, form.get("token", "").strip()):
                return login_form(request, next_path, error="That is not this pool's admin token.")
        except SignInThrottled as exc:
            throttled = login_form(request, next_path, error=f"{exc}.", status_code=429)
            throttled.headers["Retry-After"] = f"{exc.retry_after_s:.0f}"
            return throttled
        session = auth.sessions.open(ctx.actor)
        await run_in_threadpool(actions.signed_in, ctx, session.identity, client)
        response = RedirectResponse(next_path, status_code=303)
        auth.set_cookie(request, response, SESSION_COOKIE, session.session_id, int(ctx.session_ttl_s))
        auth.clear_cookie(response, LOGIN_COOKIE)
        return response

    @router.post("/logout")
    async def logout(request: Request, session: Session) -> Response:
        await _checked_form(auth, request, session)
        auth.sessions.close(session.session_id)
        await run_in_threadpool(actions.signed_out, ctx, session.identity, auth.client(request))
        response = RedirectResponse("/admin/login", status_code=303)
        auth.clear_cookie(response, SESSION_COOKIE)
        return response


def _add_view_routes(router: APIRouter, ctx: AdminContext, auth: AdminAuth) -> None:
    Session = Annotated[AdminSession, Depends(auth.session)]
    Page = Annotated[int, Query(alias="page", ge=1, le=1_000_000)]

    @router.get("")
    def root(session: Session) -> Response:
        return RedirectResponse("/admin/", status_code=303)

    @router.get("/")
    async def overview(session: Session, shade: Literal["throughput", "load"] = "throughput") -> Response:
        o = await run_in_threadpool(views.overview, ctx, views.Live.snapshot(ctx), shade=shade)
        return _page(auth, "overview.html", session, active="overview", o=o, refresh_s=ctx.refresh_s)

    @router.get("/institutions")
    async def institutions(session: Session, bucket: Literal["hour", "day"] = "hour") -> Response:
        items = await run_in_threadpool(views.institutions, ctx, views.Live.snapshot(ctx))
        flows = await run_in_threadpool(views.flow_charts, ctx, [i.name for i in items], bucket=bucket)
        return _page(
            auth, "institutions.html", session, active="institutions", items=items, charts=flows, bucket=bucket
        )

    @router.get("/institutions/{name:path}")
    async def institution(session: Session, name: str, bucket: Literal["hour", "day"] = "hour") -> Response:
        live = views.Live.snapshot(ctx)
        detail = await run_in_threadpool(views.institution_detail, ctx, live, name, bucket=bucket)
        if detail is None:
            return _page(auth, "error.html", session, status_code=404, message=f"No institution {name!r} in this pool.")
        return _page(auth, "institution.html", session, active="institutions", d=detail)

    @router.get("/nodes")
    async def nodes(session: Session) -> Response:
        items = await run_in_threadpool(views.node_list, ctx, views.Live.snapshot(ctx))
        return _page(auth, "nodes.html", session, active="nodes", items=items)

    @router.get("/receipts")
    def receipts(
        request: Request,
        session: Session,
        filters: Annotated[ReceiptFilter, Depends(receipt_filter)],
        page_no: Page = 1,
    ) -> Response:
        result = views.receipt_page(ctx, filters, page=page_no, per_page=PER_PAGE)
        return _page(auth, "receipts.html", session, active="receipts", r=result, args=dict(request.query_params))

    @router.get("/receipts.csv")
    def receipts_csv(session: Session, filters: Annotated[ReceiptFilter, Depends(receipt_filter)]) -> Response:
        return _csv("receipts.csv", export.receipts_csv(ctx, filters))

    @router.get("/audit")
    def audit(
        request: Request, session: Session, filters: Annotated[AuditFilter, Depends(audit_filter)], page_no: Page = 1
    ) -> Response:
        result = views.audit_page(ctx, filters, page=page_no, per_page=PER_PAGE)
        return _page(auth, "audit.html", session, active="audit", a=result, args=dict(request.query_params))

    @router.get("/audit.csv")
    def audit_csv(session: Session, filters: Annotated[AuditFilter, Depends(audit_filter)]) -> Response:
        return _csv("audit.csv", export.audit_csv(ctx, filters))


def _add_change_routes(router: APIRouter, ctx: AdminContext, auth: AdminAuth) -> None:
    """Each form posts the session's CSRF token and answers with a redirect, except a new API key."""
    Session = Annotated[AdminSession, Depends(auth.session)]

    @router.post("/grants")
    async def grant(request: Request, session: Session) -> Response:
        form = await _checked_form(auth, request, session)
        institution, reason = form.get("institution", ""), form.get("reason", "").strip()
        try:
            amount = float(form.get("credits", ""))
        except ValueError as exc:
            raise InvalidInput("credits must be a number, e.g. 100 or -25.5") from exc
        if not (-1e9 <= amount <= 1e9):
            raise InvalidInput("credits must be a number between -1e9 and 1e9")
        await run_in_threadpool(actions.grant, ctx, session.identity, institution, amount, reason)
        auth.sessions.flash(session.session_id, "ok", f"Granted {amount:g} credits to {institution}.")
        return RedirectResponse(f"/admin/institutions/{_quote(institution)}", status_code=303)

    @router.post("/keys")
    async def create_key(request: Request, session: Session) -> Response:
        form = await _checked_form(auth, request, session)
        institution = form.get("institution", "")
        key = await run_in_threadpool(actions.create_key, ctx, session.identity, institution)
        return _page(auth, "key_created.html", session, active="institutions", institution=institution, key=key)

    @router.post("/keys/revoke")
    async def revoke_key(request: Request, session: Session) -> Response:
        form = await _checked_form(auth, request, session)
        record = await run_in_threadpool(actions.revoke_key, ctx, session.identity, form.get("sha256", ""))
        auth.sessions.flash(session.session_id, "ok", f"Revoked API key {record.sha256[:12]} of {record.institution}.")
        return RedirectResponse(f"/admin/institutions/{_quote(record.institution)}", status_code=303)


def _quote(name: str) -> str:
    return quote(name, safe="")


def _csv(filename: str, rows: Iterator[str]) -> StreamingResponse:
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    return StreamingResponse(rows, media_type="text/csv; charset=utf-8", headers=headers)
