"""Admin sign-in throttled per client address; the API schema only for admins; refusals on the overview."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from coop.admin import mount_admin
from coop.admin.auth import SignInThrottle
from coop.errors import SignInThrottled
from tests.admin_pool import AdminPool, build_admin_pool, csrf_of

BURST = 3
REFILL_S = 600.0
REFUSED = {"invalid_api_key": 5, "request_too_large": 2}  # what the coordinator's API reports


class _Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_the_bucket_refills_and_right_tokens_cost_nothing() -> None:
    clock = _Clock()
    throttle = SignInThrottle(BURST, REFILL_S, max_clients=2, clock=clock)
    for _ in range(5):  # right tokens: taken and given back
        throttle.take("a")
        throttle.give_back("a")
    for _ in range(BURST):
        throttle.take("a")  # wrong ones: kept
    with pytest.raises(SignInThrottled) as info:
        throttle.take("a")
    assert info.value.retry_after_s == REFILL_S
    throttle.take("b")  # another client has its own bucket
    clock.now_s += REFILL_S / 2
    with pytest.raises(SignInThrottled) as info:
        throttle.take("a")
    assert info.value.retry_after_s == REFILL_S / 2
    clock.now_s += REFILL_S / 2
    throttle.take("a")  # one more after refill_s
    with pytest.raises(SignInThrottled):
        throttle.take("a")
    assert throttle.counts()["sign_in_throttled"] == 3


def test_only_the_latest_clients_are_remembered() -> None:
    throttle = SignInThrottle(1, REFILL_S, max_clients=2, clock=_Clock())
    for client in ("a", "b", "c"):
        throttle.take(client)
    throttle.take("a")  # forgotten when "c" came: a full bucket again
    with pytest.raises(SignInThrottled):
        throttle.take("c")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminPool]:
    pool = build_admin_pool(tmp_path_factory.mktemp("admin-sign-in"))
    try:
        yield pool
    finally:
        pool.ledger.close()


@pytest.fixture
def app(data: AdminPool) -> FastAPI:
    app = FastAPI(openapi_url=None)  # a coordinator in a pool: no public schema
    throttle = SignInThrottle(BURST, REFILL_S)
    mount_admin(app, dataclasses.replace(data.context(), sign_in=throttle, rejections=lambda: REFUSED))
    return app


def _client(app: FastAPI, host: str) -> TestClient:
    return TestClient(app, follow_redirects=False, client=(host, 50000))


def test_sign_in_by_form_is_throttled_per_client(app: FastAPI, data: AdminPool) -> None:
    with _client(app, "192.0.2.1") as mallory, _client(app, "192.0.2.2") as admin:

        def attempt(client: TestClient, token: str) -> int:
            form = client.get("/admin/login")
            sent = {"csrf_token": csrf_of(form.text), "token": token}
            response = client.post("/admin/login", data=sent)
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) == REFILL_S
                assert "Too many wrong admin tokens" in response.text
            return response.status_code

        assert [attempt(mallory, f"coop_admin_guess{i}") for i in range(BURST + 2)] == [401] * BURST + [429] * 2
        assert attempt(mallory, data.admin_token) == 429  # refused unchecked: the right guess is not revealed
        assert attempt(admin, data.admin_token) == 303  # another address signs in


def test_bearer_tokens_are_throttled_too(app: FastAPI, data: AdminPool) -> None:
    with _client(app, "192.0.2.3") as mallory, _client(app, "192.0.2.4") as admin:
        statuses = [
            mallory.get("/admin/api/overview", headers={"Authorization": f"Bearer guess{i}"}).status_code
            for i in range(BURST + 1)
        ]
        assert statuses == [401] * BURST + [429]
        refused = mallory.get("/admin/api/overview", headers={"Authorization": f"Bearer {data.admin_token}"})
        assert refused.status_code == 429 and refused.headers["Retry-After"] == f"{REFILL_S:.0f}"
        assert refused.json()["error"]["code"] == "sign_in_throttled"

        overview = admin.get("/admin/api/overview", headers={"Authorization": f"Bearer {data.admin_token}"})
        assert overview.status_code == 200, overview.text
        assert overview.json()["refused"] == {
            **REFUSED,
            "admin_sign_in_failed": BURST,
            "sign_in_throttled": 2,
        }


def test_the_schema_is_for_admins_only(app: FastAPI, data: AdminPool) -> None:
    with _client(app, "192.0.2.5") as client:
        assert client.get("/openapi.json").status_code == 404
        assert client.get("/admin/api/openapi.json").status_code == 401
        schema = client.get("/admin/api/openapi.json", headers={"Authorization": f"Bearer {data.admin_token}"})
        assert schema.status_code == 200
        assert "/admin/api/overview" in schema.json()["paths"]


def test_the_overview_page_shows_the_refusals(app: FastAPI, data: AdminPool) -> None:
    with _client(app, "192.0.2.6") as client:
        form = client.get("/admin/login")
        client.post("/admin/login", data={"csrf_token": csrf_of(form.text), "token": data.admin_token})
        page = client.get("/admin/").text
    assert "Refused requests" in page
    for code, count in REFUSED.items():
        assert f'<tr data-code="{code}"><td><code>{code}</code></td><td class="num">{count}</td></tr>' in page
