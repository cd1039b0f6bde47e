"""The admin view in a real headless Chromium, against a coordinator app served over real HTTP.

The coordinator is the real app (`create_app` with the pool's API-key gate, a tiny local model)
with the admin view mounted; its ledger holds receipts booked through the real checking path
(see tests/admin_pool.py). Screenshots of every page go to artifacts/admin/; with
COOP_UPDATE_DOCS=1 the overview also replaces docs/admin-overview.png, which the README shows.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import Browser

from coop.admin import mount_admin
from coop.coordinator.http.app import create_app
from coop.coordinator.http.auth import ApiKeyGate
from coop.ledger.models import FLOPS_PER_CREDIT
from coop.pipeline.local import LocalBackend
from coop.pool.api_keys import api_key_digest
from coop.pool.registry import API_KEYS_FILE
from tests.admin_pool import LIVE_KEYS, LIVE_NODES, MEMBERS, OPEN_ROUTES, XSS_NAME, AdminPool, build_admin_pool
from tests.browser import Tab, credits_text, launch_chromium, open_tab, shoot, sign_in
from tests.conftest import REPO_ROOT
from tests.http_servers import serve_in_thread

pytestmark = pytest.mark.slow

DOCS_SCREENSHOT = Path(REPO_ROOT) / "docs" / "admin-overview.png"
UPDATE_DOCS = os.environ.get("COOP_UPDATE_DOCS") == "1"  # read at import: the autouse fixture clears COOP_*

PAGES = {  # path -> screenshot name
    "/admin/": "overview",
    "/admin/institutions": "institutions",
    "/admin/institutions/beta-lab": "institution",
    "/admin/nodes": "nodes",
    "/admin/receipts": "receipts",
    "/admin/audit": "audit",
}
API = ["/admin/api/overview", "/admin/api/institutions", "/admin/api/institutions/beta-lab", "/admin/api/nodes"]
API += ["/admin/api/receipts", "/admin/api/audit"]


@dataclass
class Coordinator:
    url: str
    data: AdminPool


@pytest.fixture(scope="module")
def coordinator(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    data = build_admin_pool(tmp_path_factory.mktemp("admin"))
    app = create_app(LocalBackend(tiny_llama_dir), keys=ApiKeyGate(data.pool.directory / API_KEYS_FILE))
    context = data.context()
    context.refresh_s = 1.0
    mount_admin(app, context)
    try:
        with serve_in_thread(app) as url:
            yield Coordinator(url, data)
    finally:
        data.ledger.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def tab(browser: Browser, coordinator: Coordinator) -> Iterator[Tab]:
    with open_tab(browser, coordinator.url) as opened:
        yield opened


# ------------------------------------------------------------------------------------------------- tests


def test_without_a_session_pages_redirect_to_sign_in_and_the_api_answers_401(coordinator: Coordinator) -> None:
    with httpx.Client(base_url=coordinator.url, follow_redirects=False, timeout=10) as http:
        for path in [*PAGES, "/admin", "/admin/receipts.csv", "/admin/audit.csv", "/admin/institutions/nope"]:
            response = http.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"] == f"/admin/login?next={quote(path, safe='')}"
        for path in ["/admin/grants", "/admin/keys", "/admin/keys/revoke", "/admin/logout"]:
            response = http.post(path, data={"institution": "beta-lab", "credits": "1", "reason": "x"})
            assert response.status_code == 303 and response.headers["location"].startswith("/admin/login"), path
        for path in API:
            response = http.get(path)
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "admin_sign_in_required"
        for path in ["/admin/api/grants", "/admin/api/keys", "/admin/api/keys/revoke"]:
            assert http.post(path, json={}).status_code == 401, path
        wrong = http.get("/admin/api/overview", headers={"Authorization": "Bearer coop_admin_wrong"})
        assert wrong.status_code == 401
        right = http.get("/admin/api/overview", headers={"Authorization": f"Bearer {coordinator.data.admin_token}"})
        assert right.status_code == 200 and right.json()["nodes_online"] == len(LIVE_NODES)


def test_every_page_shows_the_real_ledger_and_the_coverage_map(tab: Tab, coordinator: Coordinator) -> None:
    data, page = coordinator.data, tab.page
    sign_in(tab, data.admin_token, "/admin/nodes")  # lands where it was going

    page.goto("/admin/")
    spans = page.locator("#coverage svg rect.span")
    assert spans.count() == len(LIVE_NODES)
    assert {spans.nth(i).get_attribute("data-node") for i in range(spans.count())} == set(LIVE_KEYS)
    assert page.locator("#coverage svg rect.gap").count() == 0
    assert page.locator("[data-field=nodes_online]").inner_text() == str(len(LIVE_NODES))
    assert page.locator("[data-field=live_sessions]").inner_text() == str(len(OPEN_ROUTES))
    # the live part re-reads /admin/api/overview by itself (the shipped script, under the page's CSP)
    page.wait_for_selector("#live[data-refreshed-at]", timeout=10_000)
    overview = shoot(tab, "overview")
    if UPDATE_DOCS:
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(overview, DOCS_SCREENSHOT)

    page.goto("/admin/institutions")
    for balance in data.ledger.balances():
        row = page.locator(f'tr[data-institution="{balance.institution}"]')
        assert row.locator("td.balance").inner_text() == credits_text(balance.balance_flops), balance.institution
    assert page.locator(".multiples svg.flows").count() >= len(MEMBERS)
    shoot(tab, "institutions")

    page.goto("/admin/institutions/beta-lab?bucket=day")
    beta = data.ledger.balance("beta-lab")
    assert beta is not None
    assert page.locator("#balance").inner_text() == credits_text(beta.balance_flops)
    assert page.locator("svg.flows").count() == 1
    shoot(tab, "institution")

    page.goto("/admin/nodes")
    for key in LIVE_KEYS:
        assert "online" in page.locator(f'tr[data-node="{key}"]').inner_text()
    shoot(tab, "nodes")

    page.goto("/admin/receipts")
    total = len(data.ledger.receipts())
    assert f"{total} in all" in page.locator(".pager").inner_text()
    shoot(tab, "receipts")
    page.get_by_role("link", name="older →").click()
    page.wait_for_url("**page=2**")
    page.goto("/admin/receipts?institution=gamma-institute")
    gamma = [r for r in data.ledger.receipts() if "gamma-institute" in (r.provider, r.consumer)]
    assert f"{len(gamma)} in all" in page.locator(".pager").inner_text()
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    lines = Path(download.value.path()).read_text().strip().splitlines()
    assert len(lines) == len(gamma) + 1 and lines[0].startswith("receipt_id,")

    page.goto("/admin/audit")
    assert page.locator('tr[data-action="admin_signed_in"]').count() >= 1
    shoot(tab, "audit")
    assert tab.problems == []


def test_grant_and_revoke_through_the_browser_show_in_the_ledger_and_the_audit_log(
    tab: Tab, coordinator: Coordinator
) -> None:
    data, page = coordinator.data, tab.page
    key = data.api_keys["alpha-university"]
    models = httpx.get(f"{coordinator.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert models.status_code == 200
    before = data.ledger.balance("beta-lab")
    assert before is not None
    sign_in(tab, data.admin_token, "/admin/institutions/beta-lab")

    page.fill("#credits", "250")
    page.fill("#reason", "GPU donation bonus")
    page.get_by_role("button", name="Grant").click()
    page.wait_for_selector("text=Granted 250 credits to beta-lab.")
    after = data.ledger.balance("beta-lab")
    assert after is not None and after.balance_flops - before.balance_flops == 250 * FLOPS_PER_CREDIT
    assert page.locator("#balance").inner_text() == credits_text(after.balance_flops)

    page.goto("/admin/institutions/alpha-university")
    row = page.locator(f'tr[data-key="{api_key_digest(key)[:12]}"]')
    row.get_by_role("button", name="Revoke").click()
    page.wait_for_selector("text=Revoked API key")
    assert "revoked" in page.locator(f'tr[data-key="{api_key_digest(key)[:12]}"]').inner_text()
    models = httpx.get(f"{coordinator.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert models.status_code == 401, "a revoked key stops working at its next request"

    page.goto("/admin/audit")
    page.select_option("select[name=action]", "credits_granted")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**action=credits_granted**")
    granted = page.locator('tr[data-action="credits_granted"]', has_text="GPU donation bonus")
    assert "admin (web)" in granted.inner_text() and "beta-lab" in granted.inner_text()
    page.goto("/admin/audit?action=api_key_revoked")
    revoked = page.locator('tr[data-action="api_key_revoked"]').first
    assert "admin (web)" in revoked.inner_text() and "alpha-university" in revoked.inner_text()
    assert api_key_digest(key)[:12] in revoked.inner_text()
    events = {(e.actor, e.action, e.subject) for e in data.ledger.audit_events()}
    assert {
        ("admin (web)", "credits_granted", "beta-lab"),
        ("admin (web)", "api_key_revoked", "alpha-university"),
    } <= events
    assert tab.problems == []


def test_forms_without_the_csrf_token_are_refused(tab: Tab, coordinator: Coordinator) -> None:
    data = coordinator.data
    sign_in(tab, data.admin_token)
    before = data.ledger.balance("beta-lab")
    request = tab.context.request  # shares the signed-in browser's cookies
    forged = {"institution": "beta-lab", "credits": "1000", "reason": "forged"}
    for form in (forged, {**forged, "csrf_token": "not-the-token"}):
        response = request.post("/admin/grants", form=form, max_redirects=0)
        assert response.status == 403, response.text()
    assert request.post("/admin/logout", form={}, max_redirects=0).status == 403
    api = request.post("/admin/api/grants", data={"institution": "beta-lab", "credits": 1000, "reason": "forged"})
    assert api.status == 403 and api.json()["error"]["code"] == "csrf_token_invalid"
    login = request.post("/admin/login", form={"token": data.admin_token}, max_redirects=0)
    assert login.status == 403
    assert data.ledger.balance("beta-lab") == before
    tab.page.goto("/admin/")  # still signed in: the refusals changed nothing
    assert tab.page.url.endswith("/admin/")


def test_an_institution_named_like_a_script_renders_as_text(tab: Tab, coordinator: Coordinator) -> None:
    page = tab.page
    sign_in(tab, coordinator.data.admin_token, "/admin/institutions")
    cell = page.locator(f'tr[data-institution="{XSS_NAME}"] a')
    assert cell.inner_text() == XSS_NAME
    cell.click()
    page.wait_for_url(f"**/admin/institutions/{quote(XSS_NAME, safe='')}")
    assert page.locator("h1").inner_text().startswith(XSS_NAME)
    assert page.locator("main script").count() == 0
    page.goto("/admin/audit")
    assert page.get_by_text(XSS_NAME).count() >= 1
    shoot(tab, "institution-script-name")
    assert tab.problems == [], "no alert() dialog, no script error"
