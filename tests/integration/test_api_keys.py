"""API keys on the HTTP API: 401 without a valid key, 429 over a key's limits, revocation at once."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coop.coordinator.http.app import create_app
from coop.coordinator.http.auth import ApiKeyGate
from coop.pipeline.local import LocalBackend
from coop.pool.bundle import PoolLimits
from coop.pool.registry import add_member, create_api_key, revoke_api_keys, revoke_member
from tests.http_servers import serve_in_thread
from tests.pools import make_pool

pytestmark = pytest.mark.slow
LIMITS = PoolLimits(max_tokens_per_request=40, max_concurrent_requests_per_key=2)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pool(tmp_path_factory.mktemp("pool") / "pool", "Test pool", ("Uni A", "Uni B")).directory


@pytest.fixture(scope="module")
def url(pool_dir: Path, tiny_chat_model_dir: str) -> Iterator[str]:
    gate = ApiKeyGate(pool_dir / "api_keys.json", LIMITS)
    create_api_key(pool_dir, "Uni A")  # the key file must exist before the gate reads it
    app = create_app(LocalBackend(tiny_chat_model_dir, max_context=200), keys=gate)
    with serve_in_thread(app) as base_url:
        yield base_url


def _chat(url: str, key: str | None, max_tokens: int = 4) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_missing_and_wrong_keys_are_401(url: str) -> None:
    for key in (None, "coop_not-a-real-key", ""):
        response = _chat(url, key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401


def test_valid_key_works_and_revocation_is_immediate(url: str, pool_dir: Path) -> None:
    key_a = create_api_key(pool_dir, "Uni A")
    key_b = create_api_key(pool_dir, "Uni B")
    assert _chat(url, key_a).status_code == 200
    assert _chat(url, key_b).status_code == 200
    revoke_api_keys(pool_dir, "Uni B")
    assert _chat(url, key_b).status_code == 401
    assert _chat(url, key_a).status_code == 200  # other members carry on


def test_revoked_member_keys_are_401(url: str, pool_dir: Path) -> None:
    add_member(pool_dir, "Uni C")
    key_c = create_api_key(pool_dir, "Uni C")
    assert _chat(url, key_c).status_code == 200
    revoke_member(pool_dir, "Uni C")
    assert _chat(url, key_c).status_code == 401


def test_limits_are_429(url: str, pool_dir: Path) -> None:
    key = create_api_key(pool_dir, "Uni A")
    over = _chat(url, key, max_tokens=41)
    assert over.status_code == 429 and "limit of 40" in over.json()["error"]["message"]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    with contextlib.ExitStack() as streams:
        for _ in range(LIMITS.max_concurrent_requests_per_key):  # hold both slots with unread streams
            response = streams.enter_context(
                httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
            )
            assert response.status_code == 200
        third = _chat(url, key)
        assert third.status_code == 429 and "in flight" in third.json()["error"]["message"]
    assert _chat(url, key).status_code == 200  # slots are released when streams end


def test_key_file_holds_no_keys(pool_dir: Path) -> None:
    key = create_api_key(pool_dir, "Uni A")
    text = (pool_dir / "api_keys.json").read_text()
    assert key not in text and key[len("coop_") :] not in text
    assert all(len(record["sha256"]) == 64 for record in json.loads(text)["keys"])
