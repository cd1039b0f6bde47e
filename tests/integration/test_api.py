"""The OpenAI-compatible API over a real uvicorn server with the demo model in three local spans."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import torch

from coop.client import ApiError, Client
from coop.coordinator.http.app import create_app
from coop.coordinator.http.text_stream import IncrementalDetokenizer
from coop.errors import InvalidTensor, PeerError, RouteUnavailable
from coop.model.client_part import ClientPart
from coop.pipeline.generation import Chain
from coop.pipeline.local import LocalBackend
from coop.pipeline.remote import RemoteChain
from tests.hostile_node import HostileNode
from tests.http_servers import serve_in_thread
from tests.reference_tokens import local_tokens
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

SPANS = [(0, 10), (10, 20), (20, 30)]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def backend(demo_model_dir: str) -> LocalBackend:
    return LocalBackend(demo_model_dir, SPANS)


@pytest.fixture(scope="module")
def base_url(backend: LocalBackend) -> Iterator[str]:
    with serve_in_thread(create_app(backend)) as url:
        yield url


@pytest.fixture(scope="module")
def oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def reference_ids(backend: LocalBackend) -> list[int]:
    """Greedy tokens of the question straight through a LocalChain, without HTTP."""
    return local_tokens(backend, backend.client.encode_chat(QUESTION), MAX_TOKENS)


def _post(base_url: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", timeout=60, **kwargs)


def _assert_error(response: httpx.Response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return str(error["message"])


# -- happy paths --------------------------------------------------------------------------------


def test_health_and_models(base_url: str, oai: openai.OpenAI) -> None:
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok", "model": "smollm2-demo"}
    assert [m.id for m in oai.models.list()] == ["smollm2-demo"]


def test_greedy_chat_matches_local_chain(base_url: str, backend: LocalBackend, reference_ids: list[int]) -> None:
    body = {"model": "smollm2-demo", "messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = _post(base_url, "/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "chat.completion"
    assert data["coop"]["token_ids"] == reference_ids
    assert [(hop["start"], hop["end"]) for hop in data["coop"]["route"]] == SPANS
    text = data["choices"][0]["message"]["content"]
    assert "Paris" in text
    assert text == backend.client.decode(reference_ids)
    eos = reference_ids[-1] in backend.client.eos_token_ids
    assert data["choices"][0]["finish_reason"] == ("stop" if eos else "length")
    prompt_tokens = len(backend.client.encode_chat(QUESTION))
    assert data["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(reference_ids),
        "total_tokens": prompt_tokens + len(reference_ids),
    }


def test_openai_client_plain_and_stream_agree(oai: openai.OpenAI, reference_ids: list[int]) -> None:
    kwargs: Any = {"model": "smollm2-demo", "messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0}
    plain = oai.chat.completions.create(**kwargs)
    text = plain.choices[0].message.content
    assert text is not None and "Paris" in text
    assert plain.usage is not None and plain.usage.completion_tokens == len(reference_ids)

    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_first_contact_gets_the_models_recommended_sampling(oai: openai.OpenAI) -> None:
    """The plain OpenAI client with no sampling arguments: the demo model's card values (temperature
    0.2, top_p 0.9), not OpenAI's temperature 1, which makes a 135M model babble. The seed only
    makes the draw repeatable; explicit values, greedy included, still win."""
    card = oai.models.list().data[0].model_dump()
    assert card["sampling_defaults"] == {"temperature": 0.2, "top_p": 0.9, "top_k": None, "origin": "model card"}
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    answer = oai.chat.completions.create(model="smollm2-demo", messages=question, max_tokens=MAX_TOKENS, seed=1)
    extras = answer.model_dump()["coop"]
    assert extras["sampling"] == {"temperature": 0.2, "top_p": 0.9, "top_k": 0, "seed": 1}
    assert "Paris" in (answer.choices[0].message.content or "")
    explicit = oai.chat.completions.create(
        model="smollm2-demo", messages=question, max_tokens=2, temperature=0, top_p=1.0
    ).model_dump()["coop"]
    assert explicit["sampling"] == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}


def test_completions_endpoint(oai: openai.OpenAI, backend: LocalBackend) -> None:
    prompt = "The capital of France is"
    result = oai.completions.create(model="smollm2-demo", prompt=prompt, max_tokens=8, temperature=0)
    assert result.object == "text_completion"
    assert result.choices[0].text.strip()
    assert result.usage is not None and result.usage.prompt_tokens == len(backend.client.encode(prompt))
    streamed = oai.completions.create(model="smollm2-demo", prompt=[prompt], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == result.choices[0].text


def test_stop_sequence_cuts_text(oai: openai.OpenAI) -> None:
    kwargs: Any = {"model": "smollm2-demo", "messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0}
    full = oai.chat.completions.create(**kwargs).choices[0].message.content
    assert full is not None and "Paris" in full
    cut = oai.chat.completions.create(stop=["Paris"], **kwargs)
    assert cut.choices[0].message.content == full[: full.index("Paris")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = oai.chat.completions.create(stop="Paris", stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index("Paris")]


def test_concurrent_requests_mixing_stream_and_plain(oai: openai.OpenAI) -> None:
    kwargs: Any = {"model": "smollm2-demo", "messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0}

    def plain(_: int) -> str:
        return oai.chat.completions.create(**kwargs).choices[0].message.content or ""

    def streamed(_: int) -> str:
        chunks = oai.chat.completions.create(stream=True, **kwargs)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(plain if i % 2 else streamed, i) for i in range(4)]
        texts = [f.result(timeout=120) for f in futures]
    assert len(set(texts)) == 1 and "Paris" in texts[0]


# -- errors -------------------------------------------------------------------------------------


def test_unknown_model_is_404(base_url: str, oai: openai.OpenAI) -> None:
    response = _post(base_url, "/v1/chat/completions", json={"model": "gpt-9", "messages": QUESTION})
    assert "gpt-9" in _assert_error(response, 404, "model_not_found")
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-9", messages=QUESTION)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model": "smollm2-demo", "messages": []}, "messages"),
        ({"model": "smollm2-demo", "messages": QUESTION, "max_tokens": 100_000}, "8192"),
        ({"model": "smollm2-demo", "messages": QUESTION, "n": 2}, "n=2"),
        ({"model": "smollm2-demo", "messages": QUESTION, "temperature": -1}, "temperature"),
        ({"model": "smollm2-demo"}, "messages"),
    ],
    ids=["empty-messages", "max-tokens-too-large", "n=2", "bad-temperature", "no-messages"],
)
def test_bad_chat_requests_are_400(base_url: str, body: dict[str, Any], needle: str) -> None:
    assert needle in _assert_error(_post(base_url, "/v1/chat/completions", json=body), 400)


def test_max_tokens_message_names_the_numbers(base_url: str, backend: LocalBackend) -> None:
    body = {"messages": QUESTION, "max_tokens": 8190}
    message = _assert_error(_post(base_url, "/v1/chat/completions", json=body), 400, "context_length_exceeded")
    prompt_tokens = len(backend.client.encode_chat(QUESTION))
    assert all(str(n) in message for n in (8192, prompt_tokens, 8190, prompt_tokens + 8190))


def test_bad_completion_requests_are_400(base_url: str) -> None:
    assert "prompt" in _assert_error(_post(base_url, "/v1/completions", json={"prompt": ""}), 400)
    assert "batched" in _assert_error(_post(base_url, "/v1/completions", json={"prompt": ["a", "b"]}), 400)


def test_malformed_json_is_400(base_url: str) -> None:
    response = _post(
        base_url, "/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"}
    )
    assert "JSON" in _assert_error(response, 400, "invalid_json")


def test_unknown_fields_are_ignored(base_url: str) -> None:
    body = {"messages": QUESTION, "max_tokens": 2, "temperature": 0, "frobnicate": True, "logit_bias": {}}
    assert _post(base_url, "/v1/chat/completions", json=body).status_code == 200


def test_unknown_path_uses_the_envelope(base_url: str) -> None:
    _assert_error(httpx.get(f"{base_url}/v1/nothing"), 404)


class _NoRouteBackend:
    """A pool in which blocks 10:20 have no live node."""

    def __init__(self, client: ClientPart) -> None:
        self.client = client
        self.model_name = "smollm2-demo"
        self.max_context = 8192

    async def open_chain(self, max_length: int, **kwargs: object) -> Chain:
        raise RouteUnavailable([(10, 20)], 30)


def test_route_unavailable_is_503(backend: LocalBackend) -> None:
    with serve_in_thread(create_app(_NoRouteBackend(backend.client))) as url:
        for stream in (False, True):
            body = {"messages": QUESTION, "max_tokens": 4, "stream": stream}
            message = _assert_error(_post(url, "/v1/chat/completions", json=body), 503, "route_unavailable")
            assert "10:20" in message
        with Client(url) as sdk, pytest.raises(ApiError) as info:
            sdk.chat(QUESTION, max_tokens=4)
        assert info.value.status == 503 and info.value.retryable and "10:20" in str(info.value)


class _FailingChain:
    """Runs the prompt, then the node serving the later blocks vanishes."""

    def __init__(self, inner: Chain) -> None:
        self.inner = inner
        self.hops = inner.hops
        self.failovers = 0
        self.draft_tokens = inner.draft_tokens
        self.steps = 0

    async def step(self, hidden: torch.Tensor, start_position: int, token_ids: Sequence[int]) -> torch.Tensor:
        self.steps += 1
        if self.steps > 2:
            raise PeerError("node 12D3KooWexample (blocks 20:30) stopped answering")
        return await self.inner.step(hidden, start_position, token_ids)

    async def close(self) -> None:
        await self.inner.close()


class _FlakyBackend:
    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner
        self.client = inner.client
        self.model_name = inner.model_name
        self.max_context = inner.max_context

    async def open_chain(self, max_length: int, **kwargs: object) -> Chain:
        return _FailingChain(await self.inner.open_chain(max_length))


def _wait_for_no_sessions(backend: LocalBackend, timeout_s: float = 30.0) -> None:
    wait_for(
        "every engine session to be released",
        lambda: not any(engine.session_count for engine in backend.engines),
        timeout_s,
        every_s=0.05,
    )


def test_peer_failure_is_502_or_an_error_event(backend: LocalBackend) -> None:
    with serve_in_thread(create_app(_FlakyBackend(backend))) as url:
        body = {"messages": QUESTION, "max_tokens": 8, "temperature": 0}
        assert "stopped answering" in _assert_error(_post(url, "/v1/chat/completions", json=body), 502, "peer_error")

        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "peer_error" and "stopped answering" in error["message"]
        assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"

        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="stopped answering"):
            list(oai.chat.completions.create(model="smollm2-demo", messages=QUESTION, max_tokens=8, stream=True))
        with Client(url) as sdk, pytest.raises(ApiError) as info:
            list(sdk.chat_stream(QUESTION, max_tokens=8))
        assert info.value.code == "peer_error" and info.value.retryable
    _wait_for_no_sessions(backend)


class _HostileBackend:
    """The coordinator's RemoteBackend with a real RemoteChain, over a route of one hostile node."""

    def __init__(self, inner: LocalBackend, misbehaviour: str) -> None:
        self.client = inner.client
        self.model_name = inner.model_name
        self.max_context = inner.max_context
        self.misbehaviour = misbehaviour

    def chain(self, max_length: int) -> RemoteChain:
        manifest = self.client.manifest
        node = HostileNode(self.misbehaviour, manifest.hidden_size, manifest.num_blocks)
        return RemoteChain(
            node,  # type: ignore[arg-type]
            node,  # type: ignore[arg-type]
            self.client.embed,
            hidden_size=manifest.hidden_size,
            dtype=self.client.dtype,
            max_length=max_length,
        )

    async def open_chain(self, max_length: int, **kwargs: object) -> Chain:
        return await self.chain(max_length).open()


MISBEHAVIOURS = ["refuses", "fails", "sends_nan"]


@pytest.mark.parametrize("misbehaviour", MISBEHAVIOURS)
def test_remote_chain_raises_a_peers_error_as_peer_error(backend: LocalBackend, misbehaviour: str) -> None:
    async def step() -> None:
        chain = await _HostileBackend(backend, misbehaviour).chain(16).open()
        try:
            await chain.step(backend.client.embed(torch.tensor([[1, 2, 3]])), 0, [1, 2, 3])
        finally:
            await chain.close()

    with pytest.raises(PeerError) as info:
        asyncio.run(step())
    assert info.value.remote_type == "InvalidTensor"
    assert isinstance(info.value.__cause__, InvalidTensor)
    assert HostileNode.node_id in str(info.value) and "NaN" in str(info.value)


@pytest.mark.parametrize("misbehaviour", MISBEHAVIOURS)
def test_a_peers_invalid_tensor_is_502_not_the_clients_400(backend: LocalBackend, misbehaviour: str) -> None:
    with serve_in_thread(create_app(_HostileBackend(backend, misbehaviour))) as url:
        body = {"messages": QUESTION, "max_tokens": 4}
        message = _assert_error(_post(url, "/v1/chat/completions", json=body), 502, "peer_error")
        assert HostileNode.node_id in message and "InvalidTensor" in message
        with Client(url) as sdk, pytest.raises(ApiError) as info:
            sdk.chat(QUESTION, max_tokens=4)
        assert info.value.status == 502 and info.value.retryable


def test_sessions_are_closed_after_requests_and_disconnects(base_url: str, backend: LocalBackend) -> None:
    _wait_for_no_sessions(backend)  # everything the tests above did has been released
    # ignore_eos-free greedy text may end early, so ask for a long completion: minutes of work
    # if the server kept generating for a client that is gone
    long_question = [{"role": "user", "content": "Write a very long story about a dragon, in many chapters."}]
    body = {"messages": long_question, "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert any(engine.session_count for engine in backend.engines)
    # the client hung up after the first event: the server must stop and release its sessions
    _wait_for_no_sessions(backend)  # long before 4000 tokens could be generated


# -- the SDK ------------------------------------------------------------------------------------


def test_sdk_client(base_url: str, reference_ids: list[int], backend: LocalBackend) -> None:
    with Client(f"{base_url}/v1", api_key="secret") as sdk:
        assert sdk.health()["model"] == "smollm2-demo"
        assert sdk.models() == ["smollm2-demo"]
        result = sdk.chat(QUESTION, max_tokens=MAX_TOKENS, temperature=0)
        assert result.token_ids == reference_ids
        assert "Paris" in result.text
        assert result.usage.prompt_tokens == len(backend.client.encode_chat(QUESTION))
        assert result.usage.completion_tokens == len(reference_ids)
        assert "".join(sdk.chat_stream(QUESTION, max_tokens=MAX_TOKENS, temperature=0)) == result.text
        completion = sdk.complete("The capital of France is", max_tokens=4, temperature=0)
        assert completion.finish_reason == "length" and len(completion.token_ids) == 4
        with pytest.raises(ApiError) as info:
            sdk.chat(QUESTION, model="nope")
        assert info.value.status == 404 and info.value.code == "model_not_found"
        with pytest.raises(ApiError) as info:
            list(sdk.chat_stream([], max_tokens=4))
        assert info.value.status == 400 and info.value.param == "messages"


def test_sdk_unreachable_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        with Client(f"http://127.0.0.1:{port}", timeout_s=2) as sdk, pytest.raises(ApiError) as info:
            sdk.health()
    assert info.value.status is None and info.value.code == "connection_error"


# -- the detokeniser, without a server ----------------------------------------------------------


def _pieces(pieces: list[str], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed 'token ids' 0..n whose decoding is the concatenation of the given pieces."""
    detok = IncrementalDetokenizer(lambda ids: "".join(pieces[i] for i in ids), stop)
    out: list[str] = []
    for n in range(1, len(pieces) + 1):
        out.append(detok.push(list(range(n))))
        if detok.stopped:
            return out, detok
    out.append(detok.finish(list(range(len(pieces)))))
    return out, detok


def test_detokenizer_holds_back_stop_prefixes_and_partial_chars() -> None:
    out, detok = _pieces(["Hello", " wor", "ld", "!"], stop=("world",))
    assert out == ["Hello", " ", ""]  # " wor" might become "world": held until it does
    assert detok.text == "Hello " and detok.stopped

    out, detok = _pieces(["x", "<", "x"], stop=("<end>",))  # a prefix that never completes is released
    assert out == ["x", "", "<x", ""] and not detok.stopped

    # "é" split over two byte-level tokens: the first decodes to U+FFFD, which is never shown
    texts = {1: "ab", 2: "ab\ufffd", 3: "abé", 4: "abé!"}
    detok = IncrementalDetokenizer(lambda ids: texts[len(ids)])
    assert [detok.push(list(range(n))) for n in (1, 2, 3, 4)] == ["ab", "", "é", "!"]

    detok = IncrementalDetokenizer(lambda ids: texts[len(ids)])  # ends mid-character (length limit)
    assert detok.push([0, 1]) == "ab" and detok.finish([0, 1]) == ""
