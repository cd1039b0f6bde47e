"""The admin JSON API under /admin/api (in the coordinator's OpenAPI schema). HTTP only.

Signed in with the admin session cookie (a change then needs the session's CSRF token in an
``X-CSRF-Token`` header) or with ``Authorization: Bearer <admin token>``. The overview page's live
refresh reads /admin/api/overview.
"""

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from coop.admin import actions, views
from coop.admin.auth import CSRF_HEADER, AdminAuth, AdminSession
from coop.admin.context import AdminContext
from coop.admin.errors import AdminApiRoute
from coop.admin.pages import PER_PAGE, audit_filter, receipt_filter
from coop.admin.protocol import (
    ApiKeyCreatedOut,
    ApiKeyCreateIn,
    ApiKeyOut,
    ApiKeyRevokeIn,
    AuditPageOut,
    GrantIn,
    GrantOut,
    InstitutionDetailOut,
    InstitutionOut,
    NodeOut,
    OverviewOut,
    ReceiptCollectionOut,
    ReceiptPageOut,
)
from coop.admin.queries import AuditFilter, ReceiptFilter, as_utc
from coop.errors import NotFound
from coop.ledger.models import flops_to_credits
from coop.pool.api_keys import api_key_digest

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {401: {"description": "No admin session and no admin bearer token"}}


def api_router(ctx: AdminContext, auth: AdminAuth, openapi: Callable[[], dict[str, Any]]) -> APIRouter:
    """`openapi`: the app's OpenAPI schema, served to admins whether or not it is public."""
    router = APIRouter(prefix="/admin/api", route_class=AdminApiRoute, tags=["admin"], responses=UNAUTHORIZED)
    _add_read_routes(router, ctx, auth, openapi)
    _add_change_routes(router, ctx, auth)
    return router


def _add_read_routes(
    router: APIRouter, ctx: AdminContext, auth: AdminAuth, openapi: Callable[[], dict[str, Any]]
) -> None:
    Identity = Annotated[tuple[str, AdminSession | None], Depends(auth.api_identity)]
    Page = Annotated[int, Query(ge=1, le=1_000_000)]
    PerPage = Annotated[int, Query(ge=1, le=500)]

    @router.get("/openapi.json", include_in_schema=False)
    async def schema(who: Identity) -> dict[str, Any]:
        return openapi()

    @router.get("/overview")
    async def overview(who: Identity, shade: Literal["throughput", "load"] = "throughput") -> OverviewOut:
        """Pool health: the coverage map, nodes and members online, live sessions, tokens/s."""
        return await run_in_threadpool(views.overview, ctx, views.Live.snapshot(ctx), shade=shade)

    @router.get("/institutions")
    async def institutions(who: Identity) -> list[InstitutionOut]:
        return await run_in_threadpool(views.institutions, ctx, views.Live.snapshot(ctx))

    @router.get("/institutions/{name:path}")
    async def institution(who: Identity, name: str, bucket: Literal["hour", "day"] = "hour") -> InstitutionDetailOut:
        """One institution: balance, contribution and usage over time, nodes, API keys, grants, latest receipts."""
        live = views.Live.snapshot(ctx)
        detail = await run_in_threadpool(views.institution_detail, ctx, live, name, bucket=bucket)
        if detail is None:
            raise NotFound(f"no institution {name!r} in this pool")
        return detail

    @router.get("/nodes")
    async def nodes(who: Identity) -> list[NodeOut]:
        return await run_in_threadpool(views.node_list, ctx, views.Live.snapshot(ctx))

    @router.get("/receipts")
    def receipts(
        who: Identity,
        filters: Annotated[ReceiptFilter, Depends(receipt_filter)],
        page: Page = 1,
        per_page: PerPage = PER_PAGE,
    ) -> ReceiptPageOut:
        """Newest first; `institution` matches the provider or the consumer; since/until bound the end time."""
        return views.receipt_page(ctx, filters, page=page, per_page=per_page)

    @router.get("/receipt-collection")
    def receipt_collection(who: Identity) -> ReceiptCollectionOut:
        """Per node: receipts booked, rejected, dropped; polls timed out or backed off; audit events suppressed."""
        if ctx.receipt_collection is None:
            raise NotFound("this coordinator collects no receipts")
        return ReceiptCollectionOut.model_validate(ctx.receipt_collection())

    @router.get("/audit")
    def audit(
        who: Identity,
        filters: Annotated[AuditFilter, Depends(audit_filter)],
        page: Page = 1,
        per_page: PerPage = PER_PAGE,
    ) -> AuditPageOut:
        """The append-only audit log, newest first."""
        return views.audit_page(ctx, filters, page=page, per_page=per_page)


def _add_change_routes(router: APIRouter, ctx: AdminContext, auth: AdminAuth) -> None:
    Identity = Annotated[tuple[str, AdminSession | None], Depends(auth.api_identity)]

    def changing(request: Request, identity: Identity) -> str:
        """Who makes a change; a cookie session must also send its CSRF token."""
        who, session = identity
        auth.require_csrf(session, request.headers.get(CSRF_HEADER))
        return who

    Changer = Annotated[str, Depends(changing)]

    @router.post("/grants")
    async def grant(body: GrantIn, who: Changer) -> GrantOut:
        """Move credits from the pool account to an institution (negative credits take them back)."""
        row = await run_in_threadpool(actions.grant, ctx, who, body.institution, body.credits, body.reason)
        return GrantOut(
            grant_id=row.grant_id,
            credits=flops_to_credits(row.flops),
            reason=row.reason,
            granted_by=row.granted_by,
            created_at=as_utc(row.created_at),
        )

    @router.post("/keys")
    async def create_key(body: ApiKeyCreateIn, who: Changer) -> ApiKeyCreatedOut:
        """A new API key for a member; the response is the only place the key appears."""
        key = await run_in_threadpool(actions.create_key, ctx, who, body.institution)
        return ApiKeyCreatedOut(institution=body.institution, key=key, key_id=api_key_digest(key)[:12])

    @router.post("/keys/revoke")
    async def revoke_key(body: ApiKeyRevokeIn, who: Changer) -> ApiKeyOut:
        record = await run_in_threadpool(actions.revoke_key, ctx, who, body.sha256)
        return ApiKeyOut(
            key_id=record.sha256[:12],
            sha256=record.sha256,
            created_at=views.utc_from_s(record.created_at),
            revoked=True,
        )
