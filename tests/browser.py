"""A real headless Chromium for tests of the admin view (Playwright): a browser, tabs that record what
went wrong on a page, signing in, screenshots."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from coop.ledger.models import FLOPS_PER_CREDIT
from tests.conftest import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(REPO_ROOT) / "artifacts" / "admin"
TIMEOUT_MS = 15_000


@contextmanager
def launch_chromium() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install it with `bash scripts/test-services` (Debian: chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS * 2)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Tab:
    page: Page
    context: BrowserContext  # the page's cookie jar
    problems: list[str]  # console errors, page errors, dialogs, requests off this origin


@contextmanager
def open_tab(browser: Browser, url: str) -> Iterator[Tab]:
    """A fresh browser context (own cookies) and page on `url`, recording anything that went wrong."""
    context = browser.new_context(viewport={"width": 1360, "height": 900}, base_url=url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: None if r.url.startswith(url) else problems.append(f"request {r.url}"))
    try:
        yield Tab(page, context, problems)
    finally:
        context.close()


def sign_in(tab: Tab, token: str, start: str = "/admin/") -> None:
    page = tab.page
    page.goto(start)
    page.wait_for_url("**/admin/login**")
    page.fill("#token", token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**{start}")


def shoot(tab: Tab, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    tab.page.screenshot(path=str(path), full_page=True)
    return path


def credits_text(flops: int) -> str:
    return f"{flops / FLOPS_PER_CREDIT:,.2f}"
