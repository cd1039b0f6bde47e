"""The chain relay: the SDK's RemoteModel through a real coordinator API (uvicorn in a thread) over a
tiny model in local spans; its limits, its checks of what clients send, and who pays for its sessions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from coop.client import ApiError, RemoteModel, ReplayUnavailable
from coop.coordinator.accounts.fair_share_admission import FairShareAdmission, RequestAdmission
from coop.coordinator.http.app import create_app
from coop.coordinator.http.auth import ApiKeyGate
from coop.coordinator.http.relay import ChainRelay
from coop.errors import CoopError, InvalidInput
from coop.pipeline.charge import UNMETERED, Charge
from coop.pipeline.generation import Chain
from coop.pipeline.local import LocalBackend, LocalChain
from coop.pool.bundle import PoolLimits
from coop.pool.registry import create_api_key
from coop.wire.generated import coop_pb2 as pb
from coop.wire.tensors import tensor_from_proto, tensor_to_proto
from tests.http_servers import serve_in_thread
from tests.pools import make_pool
from tests.reference_tokens import local_tokens
from tests.waiting import wait_for

SPANS = [(0, 3), (3, 6)]
PROMPT = [5, 17, 42, 8, 61]
MAX_NEW = 8
KEY_LIMIT = 2  # sessions (or requests) one API key may hold at once
LENGTH_LIMIT = 64  # the pool's max_tokens_per_request: the longest session a key may open
SESSIONS = "/v1/coop/sessions"


class FailoverChain:
    """A LocalChain whose next step, when told, counts as a failover (as a RemoteChain's would)."""

    def __init__(self, inner: LocalChain) -> None:
        self.inner = inner
        self.hops = inner.hops
        self.failovers = 0
        self.draft_tokens = inner.draft_tokens
        self.fail_next = False

    async def step(self, hidden: torch.Tensor, start_position: int, token_ids: Sequence[int]) -> torch.Tensor:
        if self.fail_next:
            self.fail_next, self.failovers = False, self.failovers + 1
        return await self.inner.step(hidden, start_position, token_ids)

    async def close(self) -> None:
        await self.inner.close()


class RecordingBackend:
    """The local spans, writing down who each chain is charged to; its chains can be made to fail over."""

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner
        self.client = inner.client
        self.model_name = inner.model_name
        self.max_context = inner.max_context
        self.charges: list[Charge] = []
        self.chains: list[FailoverChain] = []

    async def open_chain(self, max_length: int, charge: Charge = UNMETERED) -> Chain:
        self.charges.append(charge)
        chain = FailoverChain(LocalChain(self.inner.engines, max_length=max_length))
        self.chains.append(chain)
        return chain


@dataclass
class Coordinator:
    url: str
    backend: RecordingBackend
    admission: FairShareAdmission
    keys: dict[str, str]  # institution -> API key
    relay: ChainRelay


@pytest.fixture(scope="module")
def local(tiny_llama_dir: str) -> LocalBackend:
    return LocalBackend(tiny_llama_dir, SPANS)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pool(tmp_path_factory.mktemp("relay") / "pool", "Relay pool", ("Uni A", "Uni B")).directory


@contextmanager
def _coordinator(local: LocalBackend, pool_dir: Path | None, idle_timeout_s: float = 60.0) -> Iterator[Coordinator]:
    """With pool_dir: API keys of Uni A and Uni B and fair-share admission; without: development mode."""
    backend = RecordingBackend(local)
    admission = FairShareAdmission(8, dict)
    if pool_dir is None:
        app, keys = create_app(backend, session_idle_timeout_s=idle_timeout_s), {}
    else:
        keys = {name: create_api_key(pool_dir, name) for name in ("Uni A", "Uni B")}
        limits = PoolLimits(max_tokens_per_request=LENGTH_LIMIT, max_concurrent_requests_per_key=KEY_LIMIT)
        gate = ApiKeyGate(pool_dir / "api_keys.json", limits)
        access = RequestAdmission(admission, default_consumer="Coord")
        app = create_app(backend, keys=gate, access=access, session_idle_timeout_s=idle_timeout_s)
    with serve_in_thread(app) as url:
        yield Coordinator(url, backend, admission, keys, app.state.relay)


@pytest.fixture(scope="module")
def dev(local: LocalBackend) -> Iterator[Coordinator]:
    with _coordinator(local, None) as coordinator:
        yield coordinator


@pytest.fixture(scope="module")
def keyed(local: LocalBackend, pool_dir: Path) -> Iterator[Coordinator]:
    with _coordinator(local, pool_dir) as coordinator:
        yield coordinator


def _reference(local: LocalBackend, prompt: list[int], max_new: int) -> list[int]:
    return local_tokens(local, prompt, max_new)


def _local_step(local: LocalBackend, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [1, n, h] at position 0 through every block in this process."""

    async def run() -> torch.Tensor:
        chain = LocalChain(local.engines, max_length=hidden.shape[1])
        try:
            return await chain.step(hidden, 0)
        finally:
            await chain.close()

    return asyncio.run(run())


# -- the SDK through the relay ----------------------------------------------------------------


def test_generate_and_sessions_equal_the_local_chain(
    dev: Coordinator, local: LocalBackend, tiny_llama_dir: str
) -> None:
    expected = _reference(local, PROMPT, MAX_NEW)
    with RemoteModel.from_pretrained(tiny_llama_dir, dev.url) as model:  # development mode: no key
        assert model.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_NEW)[0].tolist() == PROMPT + expected
        sampled = [model.generate(PROMPT, 6, do_sample=True, temperature=0.8, seed=3) for _ in range(2)]
        assert torch.equal(sampled[0], sampled[1])

        new: list[int] = []
        with model.inference_session(max_length=len(PROMPT) + MAX_NEW) as session:
            assert [(hop.start, hop.end) for hop in session.route] == SPANS
            hidden = session.step(model.embed([PROMPT]), token_ids=PROMPT)
            while len(new) < MAX_NEW:
                new.append(int(model.logits(hidden)[0, -1].argmax()))
                if len(new) < MAX_NEW:
                    hidden = session.step(model.embed([[new[-1]]]), token_ids=[new[-1]])
        assert new == expected

        # hidden states edited by the caller go through as they are
        edited = model.embed([PROMPT]) * 0.5
        edited[0, 2] += 0.25
        with model.inference_session(max_length=len(PROMPT)) as session:
            out = session.step(edited)
        assert torch.allclose(out, _local_step(local, edited), atol=1e-5)
        assert not torch.allclose(out, _local_step(local, model.embed([PROMPT])), atol=1e-3)
    assert dev.backend.charges[-1].consumer.institution == ""  # development mode: nobody is billed


def test_a_failover_replays_the_token_ids_and_refuses_without(
    dev: Coordinator, local: LocalBackend, tiny_llama_dir: str
) -> None:
    expected = _reference(local, PROMPT, 2)
    with RemoteModel.from_pretrained(tiny_llama_dir, dev.url) as model:
        with_ids = model.inference_session(max_length=len(PROMPT) + 2)
        first = with_ids.step(model.embed([PROMPT]), token_ids=PROMPT)
        dev.backend.chains[-1].fail_next = True
        token = int(model.logits(first)[0, -1].argmax())
        hidden = with_ids.step(model.embed([[token]]), token_ids=[token])
        assert with_ids.failovers == 1
        assert [token, int(model.logits(hidden)[0, -1].argmax())] == expected

        without_ids = model.inference_session(max_length=len(PROMPT) + 2)
        without_ids.step(model.embed([PROMPT]))
        dev.backend.chains[-1].fail_next = True
        with pytest.raises(ReplayUnavailable, match="without token_ids"):
            without_ids.step(model.embed([[token]]), token_ids=[token])
        with pytest.raises(CoopError, match="closed"):
            without_ids.step(model.embed([[token]]))
        with_ids.close()


def test_the_sdk_checks_its_input_before_sending(dev: Coordinator, tiny_llama_dir: str) -> None:
    with RemoteModel.from_pretrained(tiny_llama_dir, dev.url) as model, model.inference_session(4) as session:
        with pytest.raises(InvalidInput, match="shape"):
            session.step(torch.zeros(1, 2, 100))
        with pytest.raises(InvalidInput, match="token_ids"):
            session.step(model.embed([[1, 2]]), token_ids=[1])
        with pytest.raises(InvalidInput, match="non-finite"):
            session.step(torch.full((1, 1, model.hidden_size), float("nan")))
        session.step(model.embed([[1, 2, 3]]))
        with pytest.raises(InvalidInput, match="max_length"):
            session.step(model.embed([[1, 2]]))
        assert session.position == 3


# -- keys, limits and billing -----------------------------------------------------------------


def test_the_relay_needs_a_valid_api_key(keyed: Coordinator, tiny_llama_dir: str, local: LocalBackend) -> None:
    for key in (None, "coop-not-a-key"):
        with pytest.raises(ApiError) as caught:
            RemoteModel.from_pretrained(tiny_llama_dir, keyed.url, api_key=key)
        assert (caught.value.status, caught.value.code) == (401, "invalid_api_key")
        response = httpx.post(f"{keyed.url}{SESSIONS}", json=_open_body(local), headers=_auth(key))
        assert (response.status_code, response.json()["error"]["code"]) == (401, "invalid_api_key")


def test_sessions_are_charged_to_the_keys_institution_and_bounded_per_key(
    keyed: Coordinator, tiny_llama_dir: str
) -> None:
    with RemoteModel.from_pretrained(tiny_llama_dir, keyed.url, api_key=keyed.keys["Uni A"]) as model:
        sessions = [model.inference_session(max_length=8) for _ in range(KEY_LIMIT)]
        assert [c.consumer.institution for c in keyed.backend.charges[-KEY_LIMIT:]] == ["Uni A"] * KEY_LIMIT
        assert keyed.admission.active == KEY_LIMIT  # each holds a fair-share session slot
        with pytest.raises(ApiError) as caught:
            model.inference_session(max_length=8)
        assert (caught.value.status, caught.value.code) == (429, "concurrency_limit")
        with RemoteModel.from_pretrained(tiny_llama_dir, keyed.url, api_key=keyed.keys["Uni B"]) as other:
            other.generate(PROMPT, max_new_tokens=2)  # another key is not held back
        assert keyed.backend.charges[-1].consumer.institution == "Uni B"
        sessions[0].close()
        model.generate(PROMPT, max_new_tokens=2)  # the slot came back
        assert keyed.backend.charges[-1].consumer.institution == "Uni A"
        with pytest.raises(ApiError) as caught:
            model.inference_session(max_length=LENGTH_LIMIT + 1)
        assert (caught.value.status, caught.value.code) == (400, "context_length_exceeded")
    assert keyed.admission.active == 0  # closing the model closed its sessions


def test_idle_sessions_are_closed_and_give_their_slots_back(
    local: LocalBackend, pool_dir: Path, tiny_llama_dir: str
) -> None:
    with _coordinator(local, pool_dir, idle_timeout_s=0.2) as coordinator:
        now = [0.0]
        coordinator.relay.clock = lambda: now[0]  # idleness by a clock of the test's, not the machine's load
        headers = _auth(coordinator.keys["Uni A"])
        opened = [_open(coordinator, headers) for _ in range(KEY_LIMIT)]
        assert coordinator.admission.active == KEY_LIMIT
        now[0] += 1.0
        wait_for("the idle sessions to be closed", lambda: coordinator.admission.active == 0, 10)
        for session_id in opened:
            response = httpx.get(f"{coordinator.url}{SESSIONS}/{session_id}", headers=headers)
            assert (response.status_code, response.json()["error"]["code"]) == (404, "session_not_found")
        assert len({_open(coordinator, headers) for _ in range(KEY_LIMIT)}) == KEY_LIMIT


def test_an_institutions_sdk_sessions_reserve_at_most_its_relay_tokens(
    local: LocalBackend, pool_dir: Path, tiny_llama_dir: str
) -> None:
    with _coordinator(local, pool_dir) as coordinator:
        coordinator.relay.max_tokens_per_institution = 20
        now = [0.0]
        coordinator.relay.clock = lambda: now[0]
        uni_a, uni_b = _auth(coordinator.keys["Uni A"]), _auth(coordinator.keys["Uni B"])
        _open(coordinator, uni_a, max_length=16)
        body = _open_body(coordinator.backend.inner, 8)
        refused = httpx.post(f"{coordinator.url}{SESSIONS}", json=body, headers=uni_a)
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "relay_tokens_exceeded")
        assert "16 tokens" in refused.json()["error"]["message"]
        _open(coordinator, uni_b, max_length=16)  # another institution has tokens of its own
        now[0] += coordinator.relay.idle_timeout_s + 1
        wait_for("the idle sessions to be closed", lambda: coordinator.admission.active == 0, 10)
        _open(coordinator, uni_a, max_length=20)  # closed sessions gave their tokens back


# -- what clients send ------------------------------------------------------------------------


def test_bad_steps_are_refused_and_the_session_carries_on(keyed: Coordinator, local: LocalBackend) -> None:
    client = local.client
    headers = _auth(keyed.keys["Uni A"])
    session_id = _open(keyed, headers, max_length=len(PROMPT) + 1)
    url = f"{keyed.url}{SESSIONS}/{session_id}/steps"
    good = client.embed(torch.tensor([PROMPT]))
    nan = good.clone()
    nan[0, 1, 3] = float("nan")
    bad: dict[str, tuple[int, str, bytes]] = {
        "wrong shape": (400, "shape", _step(torch.zeros(1, 2, client.manifest.hidden_size + 1))),
        "wrong dtype": (400, "dtype", _step(good.to(torch.float16))),
        "NaN": (400, "non-finite", _step(nan)),
        "no states": (400, "no hidden states", pb.RelayStep(start_position=0).SerializeToString()),
        "not protobuf": (400, "not a serialized", b"\xff\xff\xff"),
        "wrong position": (400, "start_position", _step(good, start_position=3)),
        "ids for fewer tokens": (400, "token_ids", _step(good, token_ids=PROMPT[:2])),
        "ids outside the vocabulary": (400, "token_ids", _step(good, token_ids=[*PROMPT[:-1], 10**6])),
        "beyond max_length": (400, "max_length", _step(client.embed(torch.tensor([[*PROMPT, 1, 2]])))),
    }
    for what, (status, needle, body) in bad.items():
        response = httpx.post(url, content=body, headers=headers)
        assert response.status_code == status, f"{what}: {response.text}"
        assert needle in response.json()["error"]["message"], what

    other = _auth(keyed.keys["Uni B"])  # another key cannot step, see or close it
    assert httpx.post(url, content=_step(good, token_ids=PROMPT), headers=other).status_code == 404
    assert httpx.delete(f"{keyed.url}{SESSIONS}/{session_id}", headers=other).status_code == 404
    unknown = httpx.post(f"{keyed.url}{SESSIONS}/{'0' * 32}/steps", content=_step(good), headers=headers)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "session_not_found")

    response = httpx.post(url, content=_step(good, token_ids=PROMPT), headers=headers)
    assert response.status_code == 200, response.text
    out = tensor_from_proto(pb.Tensor.FromString(response.content))
    assert torch.allclose(out, _local_step(local, good), atol=1e-5)
    assert httpx.delete(f"{keyed.url}{SESSIONS}/{session_id}", headers=headers).status_code == 204
    assert httpx.delete(f"{keyed.url}{SESSIONS}/{session_id}", headers=headers).status_code == 404


def test_oversized_bodies_are_refused_before_they_are_read(keyed: Coordinator, local: LocalBackend) -> None:
    headers = _auth(keyed.keys["Uni A"])
    session_id = _open(keyed, headers, max_length=4)
    url = f"{keyed.url}{SESSIONS}/{session_id}/steps"
    hidden_size = local.client.manifest.hidden_size
    big = _step(torch.zeros(1, 64, hidden_size))  # 16x what the session has room for
    declared = httpx.post(url, content=big, headers=headers)
    assert (declared.status_code, declared.json()["error"]["code"]) == (413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    streamed = httpx.post(url, content=chunks(), headers=headers)
    assert (streamed.status_code, streamed.json()["error"]["code"]) == (413, "request_too_large")
    fits = httpx.post(url, content=_step(torch.zeros(1, 4, hidden_size)), headers=headers)
    assert fits.status_code == 200, fits.text
    assert httpx.delete(f"{keyed.url}{SESSIONS}/{session_id}", headers=headers).status_code == 204


def test_opening_checks_the_model_and_the_length(keyed: Coordinator, local: LocalBackend) -> None:
    headers = _auth(keyed.keys["Uni A"])
    for body, code in [
        ({**_open_body(local), "model_hash": "0" * 64}, "model_mismatch"),
        ({**_open_body(local), "max_length": LENGTH_LIMIT + 1}, "context_length_exceeded"),
        ({**_open_body(local), "max_length": 0}, "invalid_request"),
    ]:
        response = httpx.post(f"{keyed.url}{SESSIONS}", json=body, headers=headers)
        assert (response.status_code, response.json()["error"]["code"]) == (400, code), response.text


# -- helpers ----------------------------------------------------------------------------------


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _open_body(local: LocalBackend, max_length: int = 8) -> dict[str, Any]:
    return {"max_length": max_length, "model_hash": local.client.manifest.content_hash}


def _open(coordinator: Coordinator, headers: dict[str, str], max_length: int = 8) -> str:
    body = _open_body(coordinator.backend.inner, max_length)
    response = httpx.post(f"{coordinator.url}{SESSIONS}", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return str(response.json()["session_id"])


def _step(hidden: torch.Tensor, start_position: int = 0, token_ids: Sequence[int] = ()) -> bytes:
    message = pb.RelayStep(hidden=tensor_to_proto(hidden), start_position=start_position, token_ids=token_ids)
    return message.SerializeToString()
