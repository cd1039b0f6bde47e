"""An HTTP client tries to exhaust the coordinator of a member pool, for real.

Pool "abuse": Alpha serves blocks 0:2 and Beta 2:4 of the tiny chat model, Gamma sends honest
requests, Mallory (a member with an API key of her own) and anonymous clients attack the pool's
coordinator process:
- bodies of 13 MB, declared or chunked, with and without a key, and malformed bodies without one:
  answered from the headers alone (401), or once the bytes read pass the limit (413);
- requests with 100,000 stop strings, sent while Gamma runs 8 streams: refused (400), and every
  stream gets the tokens a single process computes;
- brute force on the admin sign-in, by form and by bearer token: throttled (429, Retry-After) per
  client address, while the admin signs in from another address and sees every refusal counted;
- the API's schema and docs: not public in a pool.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from coop.launcher import LocalPool
from tests.chat_requests import raw_exchange
from tests.pools import make_pool

pytestmark = pytest.mark.slow
WAIT_S = 120.0
BURST = 3  # wrong admin tokens one address may send before it is throttled
MAX_REQUEST_BYTES = 4 << 20  # the coordinator's default limit
QUESTIONS = [f"Tell me about the number {n}." for n in range(8)]
MAX_TOKENS = 12
CHAT = "/v1/chat/completions"
ADMIN_ADDRESS = "127.0.0.2"  # the admin's own machine: another client address than the attackers'


@dataclass
class AbusePool:
    pool: LocalPool
    pool_dir: Path
    honest_key: str
    attacker_key: str
    admin_token: str

    @property
    def url(self) -> str:
        return self.pool.url

    def admin(self) -> httpx.Client:
        """An HTTP client from the admin's address, signed in by bearer token."""
        return httpx.Client(
            base_url=self.url,
            transport=httpx.HTTPTransport(local_address=ADMIN_ADDRESS),
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=WAIT_S,
        )


@pytest.fixture(scope="module")
def abuse(tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AbusePool]:
    disk = make_pool(
        tmp_path_factory.mktemp("abuse") / "pool",
        "Abuse pool",
        ("Alpha", "Beta", "Gamma", "Mallory"),
        coordinators=("Coord",),
        api_keys=("Gamma", "Mallory"),
    )
    bundles, honest, attacker = disk.bundles, disk.keys["Gamma"], disk.keys["Mallory"]
    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht()
        pool.start_nodes({"node-a": "0:2", "node-b": "2:4"}, {"node-a": bundles["Alpha"], "node-b": bundles["Beta"]})
        with pytest.MonkeyPatch.context() as env:
            env.setenv("COOP_COORDINATOR_ADMIN_SIGN_IN_BURST", str(BURST))
            env.setenv("COOP_COORDINATOR_ADMIN_SIGN_IN_REFILL_S", "3600")
            disk.start_coordinator(pool, "Coord")
        yield AbusePool(pool, disk.directory, honest, attacker, disk.admin_token)
    finally:
        pool.stop()


def _exchange(url: str, head: list[str], body: Iterable[bytes] = ()) -> tuple[int, dict[str, Any]]:
    return raw_exchange(url, head, body, timeout_s=WAIT_S)


def _code(answer: tuple[int, dict[str, Any]]) -> tuple[int, str]:
    return answer[0], answer[1]["error"]["code"]


def _oversized(url: str, key: str | None, *, chunked: bool, past_limit: bool = False) -> tuple[int, str]:
    """A 13 MB chat request, declared up front or chunked; of its body, nothing is sent, or (past_limit)
    just more than the coordinator's limit."""
    head = [f"POST {CHAT} HTTP/1.1", "Content-Type: application/json"]
    head += [f"Authorization: Bearer {key}"] if key else []
    head += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {13 << 20}"]
    chunk = b"x" * (64 << 10)
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
    return _code(_exchange(url, head, [framed] * (MAX_REQUEST_BYTES // len(chunk) + 1) if past_limit else []))


def test_bodies_are_refused_before_they_are_read(abuse: AbusePool) -> None:
    for chunked in (False, True):
        assert _oversized(abuse.url, None, chunked=chunked) == (401, "invalid_api_key")
        assert _oversized(abuse.url, "coop_not-a-key", chunked=chunked) == (401, "invalid_api_key")
    assert _oversized(abuse.url, abuse.attacker_key, chunked=False) == (413, "request_too_large")
    assert _oversized(abuse.url, abuse.attacker_key, chunked=True, past_limit=True) == (413, "request_too_large")
    malformed = b'{"messages": [{"role": "user", "content": '
    json_type = {"Content-Type": "application/json"}
    without_key = httpx.post(f"{abuse.url}{CHAT}", content=malformed, headers=json_type, timeout=WAIT_S)
    assert (without_key.status_code, without_key.json()["error"]["code"]) == (401, "invalid_api_key")
    with_key = httpx.post(
        f"{abuse.url}{CHAT}",
        content=malformed,
        headers={**json_type, "Authorization": f"Bearer {abuse.attacker_key}"},
        timeout=WAIT_S,
    )
    assert (with_key.status_code, with_key.json()["error"]["code"]) == (400, "invalid_json")


def _stream_tokens(url: str, key: str, question: str) -> list[int]:
    """Stream one greedy chat; the token ids the last chunk reports."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS, "temperature": 0}
    headers = {"Authorization": f"Bearer {key}"}
    token_ids: list[int] = []
    with httpx.stream("POST", f"{url}{CHAT}", json={**body, "stream": True}, headers=headers, timeout=WAIT_S) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                assert "error" not in chunk, chunk
                token_ids = chunk.get("coop", {}).get("token_ids", token_ids)
    return token_ids


def test_heavy_requests_are_refused_while_honest_streams_run(
    abuse: AbusePool, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    stops = [f"§{i}¤" for i in range(100_000)]  # 1.3 MB of stop strings
    heavy = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stop": stops}
    honest_done = threading.Event()
    answers: list[tuple[int, str]] = []

    def attack() -> None:
        headers = {"Authorization": f"Bearer {abuse.attacker_key}"}
        with httpx.Client(timeout=WAIT_S) as client:
            while not honest_done.is_set() or not answers:
                response = client.post(f"{abuse.url}{CHAT}", json=heavy, headers=headers)
                answers.append((response.status_code, response.json()["error"]["code"]))
                answers.append(_oversized(abuse.url, None, chunked=False))

    with ThreadPoolExecutor(len(QUESTIONS) + 1) as pool:
        attacker = pool.submit(attack)
        try:
            streams = [pool.submit(_stream_tokens, abuse.url, abuse.honest_key, q) for q in QUESTIONS]
            got = [s.result(timeout=WAIT_S) for s in streams]
        finally:
            honest_done.set()
        attacker.result(timeout=WAIT_S)
    assert got == [tiny_reference(q, MAX_TOKENS) for q in QUESTIONS]
    assert set(answers) == {(400, "request_limit_exceeded"), (401, "invalid_api_key")}


def test_admin_sign_in_brute_force_is_throttled(abuse: AbusePool) -> None:
    with httpx.Client(base_url=abuse.url, timeout=WAIT_S) as mallory:

        def sign_in(token: str) -> httpx.Response:
            form = mallory.get("/admin/login")
            csrf = form.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
            return mallory.post("/admin/login", data={"csrf_token": csrf, "token": token})

        statuses = [sign_in(f"coop_admin_guess{i}").status_code for i in range(BURST + 2)]
        assert statuses == [401] * BURST + [429] * 2
        right = sign_in(abuse.admin_token)  # refused unchecked: a right guess is not revealed
        assert right.status_code == 429 and int(right.headers["Retry-After"]) > 0
        bearer = mallory.get("/admin/api/overview", headers={"Authorization": f"Bearer {abuse.admin_token}"})
        assert (bearer.status_code, bearer.json()["error"]["code"]) == (429, "sign_in_throttled")
        assert mallory.get("/v1/models").status_code == 401  # one more refusal for the table

    with abuse.admin() as admin:
        overview = admin.get("/admin/api/overview")
        assert overview.status_code == 200, overview.text
        refused = overview.json()["refused"]
    assert refused["admin_sign_in_failed"] == BURST
    assert refused["sign_in_throttled"] == 4  # two wrong guesses, the right one, the bearer token
    assert refused["invalid_api_key"] >= 1


def test_api_docs_are_not_public_in_a_pool(abuse: AbusePool) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{abuse.url}{path}", timeout=WAIT_S).status_code == 404, path
    with abuse.admin() as admin:
        schema = admin.get("/admin/api/openapi.json")
    assert schema.status_code == 200 and CHAT in schema.json()["paths"]
