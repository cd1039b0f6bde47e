"""The admin view over HTTP, in process: sign-in, sessions, CSRF, escaping, the JSON API and its schema."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from coop.admin import mount_admin
from coop.admin.auth import LOGIN_COOKIE, SESSION_COOKIE, SessionStore
from coop.ledger.models import FLOPS_PER_CREDIT
from coop.pool.api_keys import ApiKeyStore, api_key_digest
from coop.pool.registry import API_KEYS_FILE
from coop.swarm.announcement import PAUSED
from coop.swarm.node_key import NodeKey, key_of
from tests.admin_pool import (
    LIVE_NODES,
    OFFLINE_NODE,
    OPEN_ROUTES,
    PAUSED_NODE,
    REVOKED,
    XSS_NAME,
    AdminPool,
    StaticSwarm,
    build_admin_pool,
    csrf_of,
)

PAGES = ["/admin", "/admin/", "/admin/institutions", "/admin/institutions/beta-lab", "/admin/nodes"]
PAGES += ["/admin/receipts", "/admin/receipts.csv", "/admin/audit", "/admin/audit.csv"]
API_GETS = ["/admin/api/overview", "/admin/api/institutions", "/admin/api/institutions/beta-lab"]
API_GETS += ["/admin/api/nodes", "/admin/api/receipts", "/admin/api/audit", "/admin/api/receipt-collection"]
FORMS = ["/admin/grants", "/admin/keys", "/admin/keys/revoke", "/admin/logout"]
API_POSTS = ["/admin/api/grants", "/admin/api/keys", "/admin/api/keys/revoke"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminPool]:
    pool = build_admin_pool(tmp_path_factory.mktemp("admin-http"))
    try:
        yield pool
    finally:
        pool.ledger.close()


@pytest.fixture(scope="module")
def app(data: AdminPool) -> FastAPI:
    app = FastAPI()
    mount_admin(app, data.context())
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, follow_redirects=False) as client:
        yield client


def sign_in(client: TestClient, token: str, next_path: str = "/admin/") -> str:
    """Signs in; returns the session's CSRF token."""
    form = client.get("/admin/login")
    response = client.post("/admin/login", data={"csrf_token": csrf_of(form.text), "token": token, "next": next_path})
    assert response.status_code == 303, response.text
    return csrf_of(client.get("/admin/").text)


def balance(data: AdminPool, name: str) -> int:
    found = data.ledger.balance(name)
    return found.balance_flops if found else 0


# -------------------------------------------------------------------------------------------- signing in


def test_without_a_session_everything_redirects_to_sign_in_or_answers_401(client: TestClient) -> None:
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"] == f"/admin/login?next={quote(path, safe='')}"
    for path in FORMS:
        assert client.post(path, data={"x": "1"}).status_code == 303, path
    for path in API_GETS:
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Bearer")
    for path in API_POSTS:
        assert client.post(path, json={}).status_code == 401, path
    assert client.get("/admin/api/overview", cookies={SESSION_COOKIE: "forged"}).status_code == 401


def test_sign_in_sets_a_strict_http_only_cookie_and_lands_where_it_was_going(
    data: AdminPool, client: TestClient
) -> None:
    form = client.get("/admin/login")
    login_cookie = form.headers["set-cookie"]
    assert "HttpOnly" in login_cookie and "SameSite=strict" in login_cookie and "Path=/admin" in login_cookie
    wrong = client.post("/admin/login", data={"csrf_token": csrf_of(form.text), "token": "coop_admin_nope"})
    assert wrong.status_code == 401 and "not this pool&#39;s admin token" in wrong.text
    form = client.get("/admin/login")
    response = client.post(
        "/admin/login", data={"csrf_token": csrf_of(form.text), "token": data.admin_token, "next": "/admin/nodes"}
    )
    assert response.status_code == 303 and response.headers["location"] == "/admin/nodes"
    cookies = response.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith(f"{SESSION_COOKIE}="))
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/admin", "Max-Age=43200"):
        assert attribute in session
    assert "Secure" not in session, "plain http on 127.0.0.1: a Secure cookie would never come back"
    assert any(c.startswith(f'{LOGIN_COOKIE}=""') for c in cookies), "the sign-in token is spent"
    assert client.get("/admin/nodes").status_code == 200
    events = data.ledger.audit_events(action="admin_signed_in")
    assert events and events[0].actor == "admin (web)" and events[0].detail == "from testclient"


def test_sign_in_refuses_a_form_from_elsewhere_and_never_redirects_off_site(
    data: AdminPool, client: TestClient
) -> None:
    assert client.post("/admin/login", data={"token": data.admin_token}).status_code == 403
    client.get("/admin/login")
    assert client.post("/admin/login", data={"token": data.admin_token, "csrf_token": "guess"}).status_code == 403
    for target in ("https://evil.example/", "//evil.example/admin", "/elsewhere"):
        client.cookies.clear()
        form = client.get("/admin/login")
        response = client.post(
            "/admin/login", data={"csrf_token": csrf_of(form.text), "token": data.admin_token, "next": target}
        )
        assert response.headers["location"] == "/admin/", target
        assert client.get(f"/admin/login?next={quote(target)}").headers["location"] == "/admin/", "signed in already"


def test_signing_out_ends_the_session(data: AdminPool, client: TestClient) -> None:
    csrf = sign_in(client, data.admin_token)
    cookie = client.cookies[SESSION_COOKIE]
    response = client.post("/admin/logout", data={"csrf_token": csrf})
    assert response.status_code == 303 and response.headers["location"] == "/admin/login"
    client.cookies.set(SESSION_COOKIE, cookie, path="/admin")  # replaying the old cookie does not help
    assert client.get("/admin/").status_code == 303
    assert data.ledger.audit_events(action="admin_signed_out")


def test_sessions_expire() -> None:
    now = [1000.0]
    store = SessionStore(ttl_s=60, clock=lambda: now[0])
    session = store.open("admin (web)")
    assert store.get(session.session_id) == session
    now[0] += 61
    assert store.get(session.session_id) is None
    assert store.get(None) is None and store.get("") is None


# ------------------------------------------------------------------------------------------------- CSRF


def test_forms_without_the_session_csrf_token_are_refused(data: AdminPool, client: TestClient) -> None:
    csrf = sign_in(client, data.admin_token)
    before = balance(data, "beta-lab")
    form = {"institution": "beta-lab", "credits": "10", "reason": "test"}
    assert client.post("/admin/grants", data=form).status_code == 403
    assert client.post("/admin/grants", data={**form, "csrf_token": csrf[:-1]}).status_code == 403
    assert client.post("/admin/grants", content=b"{}", headers={"content-type": "application/json"}).status_code == 400
    assert balance(data, "beta-lab") == before
    response = client.post("/admin/grants", data={**form, "csrf_token": csrf})
    assert response.status_code == 303 and response.headers["location"] == "/admin/institutions/beta-lab"
    assert balance(data, "beta-lab") == before + 10 * FLOPS_PER_CREDIT
    assert "Granted 10 credits to beta-lab." in client.get("/admin/institutions/beta-lab").text


def test_the_api_needs_the_csrf_header_with_a_cookie_and_nothing_more_with_the_bearer_token(
    data: AdminPool, client: TestClient
) -> None:
    csrf = sign_in(client, data.admin_token)
    body = {"institution": "gamma-institute", "credits": 2.5, "reason": "api"}
    before = balance(data, "gamma-institute")
    refused = client.post("/admin/api/grants", json=body)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_token_invalid"
    assert client.post("/admin/api/grants", json=body, headers={"X-CSRF-Token": csrf}).status_code == 200
    client.cookies.clear()
    bearer = {"Authorization": f"Bearer {data.admin_token}"}
    granted = client.post("/admin/api/grants", json=body, headers=bearer)
    assert granted.status_code == 200 and granted.json()["credits"] == 2.5
    assert balance(data, "gamma-institute") == before + 5 * FLOPS_PER_CREDIT
    actors = [e.actor for e in data.ledger.audit_events(action="credits_granted")[:2]]
    assert actors == ["admin (api)", "admin (web)"]


# ------------------------------------------------------------------------------------------ what it shows


def test_a_script_in_an_institution_name_is_text_everywhere(data: AdminPool, client: TestClient) -> None:
    sign_in(client, data.admin_token)
    for path in ("/admin/institutions", f"/admin/institutions/{quote(XSS_NAME, safe='')}", "/admin/audit"):
        html = client.get(path).text
        assert XSS_NAME not in html, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path
    detail = client.get(f"/admin/api/institutions/{quote(XSS_NAME, safe='')}").json()
    assert detail["institution"]["name"] == XSS_NAME and "<script>" not in detail["flows_svg"]


def test_pages_carry_a_strict_content_security_policy(data: AdminPool, client: TestClient) -> None:
    sign_in(client, data.admin_token)
    for path in ("/admin/", "/admin/api/overview", "/admin/login"):
        headers = client.get(path).headers
        assert "script-src 'self'" in headers["content-security-policy"], path
        assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"
    assert client.get("/admin/static/admin.css").status_code == 200


def test_overview_api_reports_the_live_swarm(data: AdminPool, client: TestClient) -> None:
    overview = client.get("/admin/api/overview?shade=load", headers={"Authorization": f"Bearer {data.admin_token}"})
    body = overview.json()
    assert body["num_blocks"] == 30 and body["blocks_uncovered"] == []
    assert body["nodes_online"] == 5 and body["members_online"] == 3
    # a session counts once, not once per node of its route
    assert body["live_sessions"] == len(OPEN_ROUTES) < sum(n["sessions"] for n in body["nodes"])
    assert body["tokens_per_s"] > 0 and len(body["token_rate"]) == 90
    assert body["coverage_svg"].startswith("<svg") and body["shade"] == "load"


def test_nodes_show_the_state_each_announces(data: AdminPool, client: TestClient) -> None:
    listed = client.get("/admin/api/nodes", headers={"Authorization": f"Bearer {data.admin_token}"}).json()
    states = {n["node_id"]: n["state"] for n in listed}
    assert states[PAUSED_NODE] == "paused" and states["alpha-a100-0"] == "serving"
    assert states[OFFLINE_NODE[0]] is None  # offline: no announcement to say
    sign_in(client, data.admin_token)
    paused = NodeKey(LIVE_NODES[PAUSED_NODE][0], PAUSED_NODE)
    row = re.search(rf'<tr data-node="{paused}">.*?</tr>', client.get("/admin/nodes").text, re.S)
    assert row is not None and '<span class="tag warn"' in row.group(0) and ">paused</span>" in row.group(0)


def test_overview_has_one_coverage_map_per_model(data: AdminPool) -> None:
    """A coordinator serving two models: each has its own row group, blocks and uncovered blocks."""
    small_node = data.swarm.nodes[0].model_copy(update={"node_id": "small-0", "model_hash": "5ma11", "end": 2})
    # online and listed, but paused: it serves no route, so its blocks count as uncovered (as /v1/models counts)
    paused = small_node.model_copy(update={"node_id": "small-1", "start": 2, "end": 4, "state": PAUSED})
    small = StaticSwarm(4, [small_node, paused], [[key_of(small_node)]])
    context = dataclasses.replace(data.context(), swarm={"big-model": data.swarm, "small-model": small})
    app = FastAPI()
    mount_admin(app, context)
    bearer = {"Authorization": f"Bearer {data.admin_token}"}
    with TestClient(app, follow_redirects=False) as client:
        body = client.get("/admin/api/overview", headers=bearer).json()
        nodes = {n["node_id"]: n["model"] for n in client.get("/admin/api/nodes", headers=bearer).json()}
        sign_in(client, data.admin_token)
        page = client.get("/admin/").text
    assert nodes["small-0"] == "small-model" and nodes["beta-h100-0"] == "big-model"
    assert '2 / 4</span><span class="label">blocks served of small-model' in page
    assert '30 / 30</span><span class="label">blocks served of big-model' in page
    big, tiny = body["models"]
    assert (big["name"], big["num_blocks"], big["blocks_uncovered"]) == ("big-model", 30, [])
    assert sorted(big["node_keys"]) == sorted(str(key_of(n)) for n in data.swarm.nodes)
    assert (tiny["name"], tiny["num_blocks"], tiny["blocks_uncovered"], tiny["node_keys"]) == (
        "small-model",
        4,
        [2, 3],
        ["alpha-university/small-0", "alpha-university/small-1"],
    )
    assert body["num_blocks"] == 30 and body["nodes_online"] == 7
    assert body["live_sessions"] == len(OPEN_ROUTES) + 1
    svg = body["coverage_svg"]
    assert svg.count("<svg") == 2 and svg.index("big-model: coverage") < svg.index("small-model: coverage")
    assert "2 of 4 blocks not served" in tiny["coverage_svg"]


def test_bad_input_gets_a_page_saying_what_is_wrong(data: AdminPool, client: TestClient) -> None:
    csrf = sign_in(client, data.admin_token)
    assert client.get("/admin/institutions/nobody").status_code == 404
    missing = client.get("/admin/api/institutions/nobody")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad_date = client.get("/admin/receipts?since=yesterday")
    assert bad_date.status_code == 400 and "since must be a date" in bad_date.text
    assert client.get("/admin/receipts?page=0").status_code == 400
    nan = client.post(
        "/admin/grants", data={"csrf_token": csrf, "institution": "beta-lab", "credits": "nan", "reason": "x"}
    )
    assert nan.status_code == 400
    unknown = client.post(
        "/admin/grants", data={"csrf_token": csrf, "institution": "nobody", "credits": "5", "reason": "x"}
    )
    assert unknown.status_code == 400 and "no institution" in unknown.text
    no_reason = client.post("/admin/grants", data={"csrf_token": csrf, "institution": "beta-lab", "credits": "5"})
    assert no_reason.status_code == 400
    revoked = client.post("/admin/keys", data={"csrf_token": csrf, "institution": REVOKED})
    assert revoked.status_code == 403 and "revoked" in revoked.text
    assert client.post("/admin/keys/revoke", data={"csrf_token": csrf, "sha256": "0" * 64}).status_code == 400


# ---------------------------------------------------------------------------------------------- API keys


def test_a_key_created_in_the_view_is_shown_once_works_and_can_be_revoked(data: AdminPool, client: TestClient) -> None:
    csrf = sign_in(client, data.admin_token)
    page = client.post("/admin/keys", data={"csrf_token": csrf, "institution": "gamma-institute"})
    assert page.status_code == 200
    key = re.search(r'id="new-key">([^<]+)<', page.text).group(1)  # type: ignore[union-attr]
    store = ApiKeyStore.load(data.pool.directory / API_KEYS_FILE)
    assert store.resolve(key) == "gamma-institute"
    assert key not in client.get("/admin/institutions/gamma-institute").text, "only ever shown once"

    digest = api_key_digest(key)
    response = client.post("/admin/keys/revoke", data={"csrf_token": csrf, "sha256": digest})
    assert response.status_code == 303
    assert ApiKeyStore.load(data.pool.directory / API_KEYS_FILE).resolve(key) is None
    audit = {(e.action, e.detail) for e in data.ledger.audit_events(limit=5)}
    assert ("api_key_created", f"key {digest[:12]}") in audit and ("api_key_revoked", f"key {digest[:12]}") in audit

    created = client.post(
        "/admin/api/keys", json={"institution": "beta-lab"}, headers={"Authorization": f"Bearer {data.admin_token}"}
    )
    assert created.status_code == 200 and created.json()["key"].startswith("coop_")
    revoked = client.post(
        "/admin/api/keys/revoke",
        json={"sha256": api_key_digest(created.json()["key"])},
        headers={"Authorization": f"Bearer {data.admin_token}"},
    )
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True


def test_the_json_api_is_in_the_openapi_schema_and_the_pages_are_not(app: FastAPI) -> None:
    paths = app.openapi()["paths"]
    assert {p for p in paths if p.startswith("/admin/api/")} == {
        "/admin/api/overview",
        "/admin/api/institutions",
        "/admin/api/institutions/{name}",
        "/admin/api/nodes",
        "/admin/api/receipts",
        "/admin/api/audit",
        "/admin/api/receipt-collection",
        "/admin/api/grants",
        "/admin/api/keys",
        "/admin/api/keys/revoke",
    }
    assert not any(p.startswith("/admin") and not p.startswith("/admin/api/") for p in paths)
