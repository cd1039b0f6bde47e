"""The admin sign-in throttle counts attempts against the socket peer: a client that writes a new
X-Forwarded-For on every guess still runs out of guesses. Only behind a trusted proxy (the
coordinator's `trusted_proxies` setting) is the address the proxy forwarded for used instead."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from coop.admin import mount_admin
from coop.admin.auth import SignInThrottle
from coop.errors import InvalidInput
from tests.admin_pool import AdminPool, build_admin_pool

BURST = 2
REFILL_S = 60.0
PROXY = "10.1.2.3"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminPool]:
    pool = build_admin_pool(tmp_path_factory.mktemp("admin-forwarded-for"))
    try:
        yield pool
    finally:
        pool.ledger.close()


def _app(data: AdminPool, trusted_proxies: tuple[str, ...] = ()) -> FastAPI:
    app = FastAPI(openapi_url=None)
    throttle = SignInThrottle(BURST, REFILL_S, trusted_proxies=trusted_proxies)
    mount_admin(app, dataclasses.replace(data.context(), sign_in=throttle))
    return app


def _guesses(client: TestClient, forwarded_for: list[str]) -> list[int]:
    return [
        client.get(
            "/admin/api/overview", headers={"Authorization": f"Bearer guess{i}", "X-Forwarded-For": address}
        ).status_code
        for i, address in enumerate(forwarded_for)
    ]


def test_a_forged_forwarded_for_does_not_buy_more_guesses(data: AdminPool) -> None:
    with TestClient(_app(data), client=("192.0.2.10", 50000)) as mallory:
        assert _guesses(mallory, [f"198.51.100.{i}" for i in range(BURST + 2)]) == [401] * BURST + [429] * 2


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(data: AdminPool) -> None:
    with TestClient(_app(data, (f"{PROXY}/32",)), client=(PROXY, 50000)) as proxy:
        # the client wrote the left part itself; the proxy appended the address it saw
        assert _guesses(proxy, ["6.6.6.6, 203.0.113.7"] * (BURST + 1)) == [401] * BURST + [429]
        assert _guesses(proxy, ["203.0.113.7, 203.0.113.8"]) == [401]  # another client behind the proxy


def test_a_trusted_proxy_that_is_no_address_is_refused() -> None:
    with pytest.raises(InvalidInput, match="not an IP address"):
        SignInThrottle(trusted_proxies=("proxy.example.org",))
