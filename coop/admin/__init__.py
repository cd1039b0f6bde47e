"""The pool's admin web view, served by the coordinator under /admin.

Pages (server-rendered, readable without JavaScript): the overview with the coverage map, live
load and the requests refused, institutions with their balances, charts, API keys and grants,
nodes, receipts and the audit log. The JSON API the pages use lives under /admin/api and is part of
the coordinator's OpenAPI schema, which signed-in admins read at /admin/api/openapi.json (in a pool
it is not public). Sign-in is with the pool's admin token (`coop pool init`); see `coop.admin.auth`.

    mount_admin(app, AdminContext(pool_dir=..., ledger=..., swarm=..., fair_share=..., token_samples=...))
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from coop.admin.api import api_router
from coop.admin.auth import AdminAuth
from coop.admin.context import (
    AdminContext,
    CounterRate,
    NodePresence,
    SwarmProvider,
    TokenRateMeter,
    TokenSamples,
)
from coop.admin.pages import pages_router

__all__ = [
    "AdminContext",
    "CounterRate",
    "NodePresence",
    "SwarmProvider",
    "TokenRateMeter",
    "TokenSamples",
    "mount_admin",
]


def mount_admin(app: FastAPI, context: AdminContext) -> None:
    """Add the admin pages, their JSON API and their static files to a coordinator's app."""
    auth = AdminAuth(
        context.pool_dir, ttl_s=context.session_ttl_s, secure_cookies=context.secure_cookies, throttle=context.sign_in
    )
    app.include_router(pages_router(context, auth))
    app.include_router(api_router(context, auth, app.openapi))
    static = StaticFiles(directory=str(files("coop.admin") / "static"))
    app.mount("/admin/static", static, name="admin-static")
