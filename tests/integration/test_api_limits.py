"""What one HTTP client can make the coordinator hold or spend, over a real uvicorn server.

The API key is checked before the body is read, the body's size before it is parsed, then the
limits on stop strings, messages and the prompt; the text work of a request runs off the event
loop, so a heavy one cannot stall the others; a node streaming junk events cannot grow the
coordinator's memory; every refusal is counted.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from coop.coordinator.http.app import create_app
from coop.coordinator.http.auth import ApiKeyGate
from coop.coordinator.http.limits import HttpLimits
from coop.pipeline.local import LocalBackend
from coop.pipeline.remote import RemoteChain
from coop.wire.generated import coop_pb2 as pb
from coop.wire.tensors import tensor_to_proto
from tests.chat_requests import raw_exchange
from tests.hostile_node import FakeSessionCall, HostileNode
from tests.http_servers import serve_in_thread
from tests.pools import make_pool
from tests.reference_tokens import local_tokens
from tests.waiting import wait_for, wait_for_async

pytestmark = pytest.mark.slow

LIMITS = HttpLimits(
    max_request_bytes=64 * 1024,
    max_stop_sequences=4,
    max_stop_chars=16,
    max_messages=8,
    max_prompt_chars=2000,
    max_prompt_tokens=64,
)
QUESTION = [{"role": "user", "content": "Say hello."}]
MAX_TOKENS = 8
CHAT = "/v1/chat/completions"
WAIT_S = 60.0


@dataclass
class Server:
    url: str
    app: FastAPI
    key: str

    def chat(self, key: str | None = None, **fields: Any) -> httpx.Response:
        body = {"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.post(f"{self.url}{CHAT}", json=body, headers=headers, timeout=WAIT_S)

    def refused(self) -> dict[str, int]:
        counts: dict[str, int] = self.app.state.rejections.snapshot()
        return counts


@pytest.fixture(scope="module")
def backend(tiny_chat_model_dir: str) -> LocalBackend:
    return LocalBackend(tiny_chat_model_dir, max_context=256)


@pytest.fixture(scope="module")
def keyed(backend: LocalBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pool_dir = tmp_path_factory.mktemp("limits") / "pool"
    disk = make_pool(pool_dir, "Limits pool", ("Uni A",), api_keys=("Uni A",))
    app = create_app(backend, keys=ApiKeyGate(disk.api_keys_file), limits=LIMITS, public_docs=False)
    with serve_in_thread(app) as url:
        yield Server(url, app, disk.keys["Uni A"])


def _reference(backend: LocalBackend, max_tokens: int = MAX_TOKENS) -> list[int]:
    return local_tokens(backend, backend.client.encode_chat(QUESTION), max_tokens)


def _exchange(url: str, head: list[str], body: Iterable[bytes] = ()) -> tuple[int, dict[str, Any]]:
    return raw_exchange(url, head, body, timeout_s=WAIT_S)


# -- before the body is parsed ------------------------------------------------------------------


def test_no_key_is_401_whatever_the_body(keyed: Server) -> None:
    json_type = {"Content-Type": "application/json"}
    malformed = httpx.post(f"{keyed.url}{CHAT}", content=b'{"messages": [', headers=json_type, timeout=WAIT_S)
    assert (malformed.status_code, malformed.json()["error"]["code"]) == (401, "invalid_api_key")
    with_key = httpx.post(
        f"{keyed.url}{CHAT}", content=b'{"messages": [', headers={**json_type, "Authorization": f"Bearer {keyed.key}"}
    )
    assert (with_key.status_code, with_key.json()["error"]["code"]) == (400, "invalid_json")

    # 13 MB declared, not a byte of it sent: the answer comes from the headers alone
    huge = [f"POST {CHAT} HTTP/1.1", "Content-Type: application/json", f"Content-Length: {13 << 20}"]
    status, body = _exchange(keyed.url, huge)
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    status, body = _exchange(keyed.url, [*huge, "Authorization: Bearer coop_not-a-key"])
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")


def test_a_body_over_the_limit_is_413_before_it_is_read(keyed: Server) -> None:
    auth = f"Authorization: Bearer {keyed.key}"
    declared = [f"POST {CHAT} HTTP/1.1", auth, "Content-Type: application/json", f"Content-Length: {13 << 20}"]
    status, body = _exchange(keyed.url, declared)
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert f"{LIMITS.max_request_bytes:,}" in body["error"]["message"]

    chunk = b"x" * 16384  # no length declared: refused once what arrived passes the limit, not at the end
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (LIMITS.max_request_bytes // len(chunk) + 1)
    chunked = [f"POST {CHAT} HTTP/1.1", auth, "Content-Type: application/json", "Transfer-Encoding: chunked"]
    status, body = _exchange(keyed.url, chunked, chunks)
    assert (status, body["error"]["code"]) == (413, "request_too_large")

    padded = keyed.chat(user="x" * (LIMITS.max_request_bytes // 2))  # under the limit: served
    assert padded.status_code == 200, padded.text


# -- the parsed request -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"stop": [f"s{i}" for i in range(5)]}, "stop", "5 stop sequences"),
        ({"stop": "x" * 17}, "stop", "17 characters"),
        ({"messages": QUESTION * 9}, "messages", "9 messages"),
        ({"messages": [{"role": "user", "content": "y" * 2001}]}, "messages", "2,001 characters"),
        ({"messages": [{"role": "user", "content": "hello " * 100}]}, "messages", "tokens"),
    ],
    ids=["stop-count", "stop-length", "messages", "characters", "prompt-tokens"],
)
def test_requests_over_a_limit_are_400(keyed: Server, fields: dict[str, Any], param: str, needle: str) -> None:
    before = keyed.refused().get("request_limit_exceeded", 0)
    response = keyed.chat(**fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("request_limit_exceeded", param, "invalid_request_error")
    assert needle in error["message"]
    assert keyed.refused()["request_limit_exceeded"] == before + 1


def test_completion_prompts_are_limited_too(keyed: Server) -> None:
    headers = {"Authorization": f"Bearer {keyed.key}"}
    for prompt in ("z" * 2001, list(range(1, 66))):
        response = httpx.post(
            f"{keyed.url}/v1/completions", json={"prompt": prompt, "max_tokens": 2}, headers=headers, timeout=WAIT_S
        )
        assert (response.status_code, response.json()["error"]["code"]) == (400, "request_limit_exceeded")
        assert response.json()["error"]["param"] == "prompt"


def test_within_the_limits_the_answer_is_the_local_one(keyed: Server, backend: LocalBackend) -> None:
    response = keyed.chat(stop=["§§§§", "¤¤¤¤"])
    assert response.status_code == 200, response.text
    assert response.json()["coop"]["token_ids"] == _reference(backend)


def test_refusals_are_counted_by_code(keyed: Server) -> None:
    before = keyed.refused()
    assert httpx.get(f"{keyed.url}/v1/models", timeout=WAIT_S).status_code == 401
    assert keyed.chat(stop=[f"s{i}" for i in range(9)]).status_code == 400
    after = keyed.refused()
    assert after["invalid_api_key"] == before.get("invalid_api_key", 0) + 1
    assert after["request_limit_exceeded"] == before.get("request_limit_exceeded", 0) + 1


def test_api_docs_can_be_kept_private(keyed: Server, backend: LocalBackend) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{keyed.url}{path}", timeout=WAIT_S).status_code == 404, path
    schema = create_app(backend).openapi()  # development mode: public, and it names the limits' errors' shape
    assert CHAT in schema["paths"]


# -- text work off the event loop ---------------------------------------------------------------


class _DecodeGate:
    """The client's decode, but the first call after `arm()` blocks until `release` (or a minute passes)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.armed = False
        self.blocked = threading.Event()
        self.release = threading.Event()

    def arm(self) -> None:
        self.armed = True

    def __call__(self, token_ids: list[int]) -> str:
        if self.armed:
            self.armed = False
            self.blocked.set()
            self.release.wait(WAIT_S)
        return self.decode(token_ids)


def test_a_request_stuck_in_text_work_stalls_no_other_stream(tiny_chat_model_dir: str) -> None:
    """A request with 100,000 stop strings (allowed here) whose detokenizing is held inside a worker
    thread: other requests must complete meanwhile, which they cannot if that work ran on the loop."""
    backend = LocalBackend(tiny_chat_model_dir, max_context=256)
    gate = _DecodeGate(backend.client.decode)
    backend.client.decode = gate  # type: ignore[method-assign]
    many_stops = HttpLimits(max_request_bytes=8 << 20, max_stop_sequences=100_000, max_stop_chars=32)
    reference = _reference(backend)
    stops = [f"§{i}¤" for i in range(100_000)]
    with serve_in_thread(create_app(backend, limits=many_stops)) as url, ThreadPoolExecutor(4) as pool:

        def chat(**fields: Any) -> list[int]:
            body = {"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
            response = httpx.post(f"{url}{CHAT}", json=body, timeout=WAIT_S)
            assert response.status_code == 200, response.text
            return list(response.json()["coop"]["token_ids"])

        gate.arm()
        heavy = pool.submit(chat, stop=stops)
        try:
            wait_for("the heavy request to be inside its text work", gate.blocked.is_set, WAIT_S)
            honest = [pool.submit(chat) for _ in range(3)]
            assert [f.result(timeout=WAIT_S) for f in honest] == [reference] * 3
            assert not heavy.done()  # still held in its worker thread all along
        finally:
            gate.release.set()
        assert heavy.result(timeout=WAIT_S) == reference


# -- the coordinator's event queue of a session -------------------------------------------------


class _FloodingCall(FakeSessionCall):
    """A node's session stream that sends `junk` stale results after opening (and running the first step),
    and counts what we read."""

    def __init__(self, junk: int, hidden_size: int, forward: Callable[[pb.StepRequest], Awaitable[pb.StepAck]]) -> None:
        super().__init__(forward)
        self.reads = 0
        stale = pb.SessionEvent.Result(step_id=10**6, hidden=tensor_to_proto(torch.zeros(1, 1, hidden_size)))
        self.junk = [pb.SessionEvent(result=stale)] * junk

    async def write(self, control: pb.SessionControl) -> None:
        await super().write(control)
        if control.WhichOneof("kind") == "open":
            for event in self.junk:
                self.events.put_nowait(event)

    async def read(self) -> object:
        self.reads += 1
        return await super().read()


class _FloodingNode(HostileNode):
    """Serves the whole model correctly (zeros in, zeros out), but floods its session stream first."""

    def __init__(self, junk: int, hidden_size: int, num_blocks: int) -> None:
        super().__init__("sends_nan", hidden_size, num_blocks)
        self.junk = junk

    def step_completed(self, hops: object, tokens: int, seconds: float) -> None:
        pass

    def Session(self) -> _FloodingCall:
        self.call = _FloodingCall(self.junk, self.hidden_size, self.forward_first_step)
        return self.call

    async def Forward(self, request: pb.StepRequest, timeout: float) -> pb.StepAck:
        result = pb.SessionEvent.Result(session_id=request.session_id, step_id=request.step_id, hidden=request.hidden)
        self.call.events.put_nowait(pb.SessionEvent(result=result))
        return pb.StepAck()


def test_a_node_flooding_its_session_stream_is_read_no_further_than_the_queue(backend: LocalBackend) -> None:
    manifest = backend.client.manifest
    junk, bound = 1000, 4
    node = _FloodingNode(junk, manifest.hidden_size, manifest.num_blocks)

    async def run() -> tuple[int, torch.Tensor, int]:
        chain = RemoteChain(
            node,  # type: ignore[arg-type]
            node,  # type: ignore[arg-type]
            backend.client.embed,
            hidden_size=manifest.hidden_size,
            dtype=backend.client.dtype,
            max_length=16,
            max_queued_events=bound,
        )
        await chain.open()
        try:
            hidden = torch.zeros(1, 2, manifest.hidden_size, dtype=backend.client.dtype)
            await chain.step(hidden, 0, [1, 2])  # opens the stream; the node floods it after this result
            call = node.call
            await wait_for_async("the reader to fill the queue", lambda: call.reads > bound, WAIT_S)
            for _ in range(1000):  # the loop runs on; a reader that went on reading would read all junk
                await asyncio.sleep(0)
            reads_while_idle = call.reads
            output = await chain.step(hidden[:, :1], 2, [1, 2, 3])  # drains the junk, then gets its result
            return reads_while_idle, output, call.reads
        finally:
            await chain.close()

    reads_while_idle, output, reads_after = asyncio.run(run())
    # the open and the first result, the queue's events and the one waiting to be put
    assert reads_while_idle <= bound + 3
    assert output.shape == (1, 1, manifest.hidden_size) and not output.any()
    assert reads_after >= junk + 3  # nothing was dropped: the step read through every event
