"""Screenshots of the admin view, taken from a real pool rather than drawn by hand.

Starts the demo pool (`coop demo`'s throwaway pool: a DHT peer, three nodes, a coordinator, all
with mutual TLS), sends chat requests from the demo client institution, waits until their receipts
are booked, and photographs every admin page in headless Chromium, signed in with the pool's admin
token, while a few streams are still running so the overview shows live sessions. The overview
replaces docs/admin-overview.png (the picture the README and docs/operate.md show); every page goes
to artifacts/screenshots/. Run through `scripts/screenshots`.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

from coop.cli.demo import DEMO_SPANS, create_demo_pool
from coop.client import Client
from coop.launcher import LocalPool
from coop.model.prepare import prepare

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WINDOW = {"width": 1360, "height": 900}
PAGES = {  # admin path -> screenshot name
    "/admin/": "overview",
    "/admin/institutions": "institutions",
    "/admin/nodes": "nodes",
    "/admin/receipts": "receipts",
    "/admin/audit": "audit",
}
QUESTIONS = [
    "What is the capital of France?",
    "Name three rivers in South America.",
    "Write a haiku about cooperation.",
    "Explain what a GPU is in one sentence.",
]
TIMEOUT_S = 120.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / ".cache" / "smollm2-demo")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "artifacts" / "screenshots")
    parser.add_argument("--docs-image", type=Path, default=REPO_ROOT / "docs" / "admin-overview.png")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"no Chromium at {CHROMIUM}: install it with `bash scripts/test-services` (Debian: chromium)")
    prepare("smollm2-demo", args.model_dir)
    scratch = tempfile.TemporaryDirectory(prefix="coop-screenshots-")
    with scratch, demo_pool(args.model_dir, Path(scratch.name)) as (pool, api_key, admin_token):
        for question in QUESTIONS:  # booked traffic: balances, receipts and charts have something to show
            Client(pool.url, api_key=api_key, timeout_s=TIMEOUT_S).chat(
                [{"role": "user", "content": question}], temperature=0, max_tokens=32
            )
        wait_for_receipts(pool.url, admin_token)
        with live_streams(pool.url, api_key):
            shots = photograph(pool.url, admin_token, args.out)
    args.docs_image.write_bytes(shots["overview"].read_bytes())
    print(f"wrote {args.docs_image.relative_to(REPO_ROOT)} and {len(shots)} pages under {args.out}")


@contextmanager
def demo_pool(model_dir: Path, scratch: Path) -> Iterator[tuple[LocalPool, str, str]]:
    """The pool `coop demo` runs, on a free port; yields it with the demo API key and the admin token."""
    pool_dir = scratch / "pool"
    demo = create_demo_pool(pool_dir)
    pool = LocalPool(str(model_dir))
    try:
        pool.start_dht(member=demo.coordinator)
        pool.start_nodes(DEMO_SPANS, demo.nodes)
        extra = ["--pool-dir", str(pool_dir), "--receipt-interval-s", "0.5"]
        pool.start_coordinator(0, demo.coordinator, pool_dir / "api_keys.json", extra_args=extra)
        yield pool, demo.api_key, demo.admin_token
    finally:
        pool.stop()


def wait_for_receipts(url: str, admin_token: str) -> None:
    """Until every node's receipts for the traffic so far are booked (one receipt per node at least)."""
    deadline = time.monotonic() + TIMEOUT_S
    headers = {"Authorization": f"Bearer {admin_token}"}
    while time.monotonic() < deadline:
        receipts = httpx.get(f"{url}/admin/api/receipts", headers=headers, timeout=10).json()
        if len({item["node_id"] for item in receipts["items"]}) >= len(DEMO_SPANS):
            return
        time.sleep(0.5)
    raise SystemExit("the demo pool's receipts were not booked in time")


@contextmanager
def live_streams(url: str, api_key: str, count: int = 3) -> Iterator[None]:
    """A few long streamed generations, running while the pages are photographed."""
    stop = threading.Event()

    def stream(index: int) -> None:
        client = Client(url, api_key=api_key, timeout_s=TIMEOUT_S)
        while not stop.is_set():
            question = QUESTIONS[index % len(QUESTIONS)]
            for _ in client.chat_stream([{"role": "user", "content": question}], temperature=0, max_tokens=256):
                if stop.is_set():
                    break

    threads = [threading.Thread(target=stream, args=(index,), daemon=True) for index in range(count)]
    for thread in threads:
        thread.start()
    time.sleep(3.0)  # the streams are open, and the overview's tokens/s has a few seconds to show
    try:
        yield
    finally:
        stop.set()


def photograph(url: str, admin_token: str, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    shots: dict[str, Path] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport=WINDOW, base_url=url).new_page()
            sign_in(page, admin_token)
            for path, name in PAGES.items():
                page.goto(path)
                page.wait_for_load_state("networkidle")
                shots[name] = out / f"{name}.png"
                page.screenshot(path=str(shots[name]), full_page=True)
        finally:
            browser.close()
    return shots


def sign_in(page: Page, admin_token: str) -> None:
    """As an admin does: the sign-in form sets the session cookie (and its CSRF double-submit token)."""
    page.goto("/admin/")
    page.wait_for_url("**/admin/login**")
    page.fill("#token", admin_token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/admin/")


if __name__ == "__main__":
    main()
