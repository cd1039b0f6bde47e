"""The research SDK: RemoteModel steps hidden states through a real coordinator's chain relay.

Pool "sdk": Alpha serves blocks 0:15 of the demo model, Beta and Delta 15:30 each (Delta's node is
the spare the failover test needs), Coord runs the coordinator with the ledger, and Gamma's API key
pays for every SDK session. Everything runs as real processes: a DHT, three nodes, the coordinator.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from coop.client import ApiError, AutoDistributedModelForCausalLM, InferenceSession, RemoteModel, ReplayUnavailable
from coop.errors import CoopError, InvalidInput
from coop.launcher import LocalPool
from coop.ledger.database import sqlite_url
from coop.ledger.store import Ledger
from coop.model.engine import SpanEngine
from coop.model.manifest import Manifest
from coop.pool.registry import create_api_key
from coop.wire.generated import coop_pb2 as pb
from coop.wire.tensors import tensor_to_proto
from tests.pools import make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
MAX_NEW = 16
WAIT_S = 60.0
SESSIONS = "/v1/coop/sessions"


@dataclass
class SdkPool:
    pool: LocalPool
    pool_dir: Path
    key: str  # Gamma's

    @property
    def url(self) -> str:
        return self.pool.url

    def ledger(self) -> Ledger:
        return Ledger.open(sqlite_url(self.pool_dir / "ledger.db"))


@pytest.fixture(scope="module")
def sdk_pool(demo_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdkPool]:
    pool_dir = tmp_path_factory.mktemp("sdk") / "pool"
    disk = make_pool(pool_dir, "SDK pool", ("Alpha", "Beta", "Delta", "Gamma"), coordinators=("Coord",))
    bundles = disk.bundles
    pool = LocalPool(demo_model_dir)
    try:
        pool.start_dht()
        nodes = {"node-a": "0:15", "node-b": "15:30", "node-b2": "15:30"}
        pool.start_nodes(nodes, {"node-a": bundles["Alpha"], "node-b": bundles["Beta"], "node-b2": bundles["Delta"]})
        disk.start_coordinator(pool, "Coord", ["--receipt-interval-s", "0.3"])
        yield SdkPool(pool, pool_dir, create_api_key(pool_dir, "Gamma"))
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def model(sdk_pool: SdkPool, demo_model_dir: str) -> Iterator[RemoteModel]:
    with RemoteModel.from_pretrained(demo_model_dir, sdk_pool.url, api_key=sdk_pool.key) as model:
        yield model


def _prompt(model: RemoteModel) -> list[int]:
    return model.client.encode_chat([{"role": "user", "content": QUESTION}])


def test_sdk_sessions_are_booked_to_the_api_keys_institution(
    sdk_pool: SdkPool, model: RemoteModel, demo_model_dir: str
) -> None:
    """Runs first, on an empty ledger: every receipt in it comes from this test's two sessions."""
    prompt = _prompt(model)
    generated = model.generate(prompt, max_new_tokens=4)[0, len(prompt) :].tolist()
    with model.inference_session(max_length=len(prompt) + 2) as session:
        hidden = session.step(model.embed([prompt]), token_ids=prompt)
        token = int(model.logits(hidden)[0, -1].argmax())
        session.step(model.embed([[token]]), token_ids=[token])
    # generate steps the prompt and every new token but the last; the session the prompt and one more
    tokens = (len(prompt) + len(generated) - 1) + (len(prompt) + 1)
    ledger = sdk_pool.ledger()
    receipts = wait_for("two receipts per session", lambda: (r := ledger.receipts()) and len(r) >= 4 and r, WAIT_S)
    manifest = Manifest.load(demo_model_dir)
    assert len(receipts) == 4
    assert {r.consumer for r in receipts} == {"Gamma"}
    assert {r.provider for r in receipts} <= {"Alpha", "Beta", "Delta"}
    assert sum(r.flops for r in receipts) == tokens * manifest.total_flops_per_token
    gamma = ledger.balance("Gamma")
    assert gamma is not None and gamma.balance_flops == -tokens * manifest.total_flops_per_token


def test_generate_greedy_equals_single_process(model: RemoteModel, reference: Callable[[str, int], list[int]]) -> None:
    prompt = _prompt(model)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW)
    assert out.shape == (1, len(prompt) + len(reference(QUESTION, MAX_NEW)))
    assert out[0].tolist() == prompt + reference(QUESTION, MAX_NEW)
    assert "Paris" in model.client.decode(out[0, len(prompt) :].tolist())
    # a plain list works too, and sampling with a seed is repeatable
    sampled = [model.generate(prompt, 6, do_sample=True, temperature=0.8, top_k=40, seed=7) for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1]) and sampled[0].shape[1] <= len(prompt) + 6


def test_manual_loop_through_an_inference_session(
    model: RemoteModel, reference: Callable[[str, int], list[int]]
) -> None:
    prompt = _prompt(model)
    new: list[int] = []
    with model.inference_session(max_length=len(prompt) + MAX_NEW) as session:
        assert isinstance(session, InferenceSession)
        assert [(hop.start, hop.end) for hop in session.route] == [(0, 15), (15, 30)]
        hidden = session.step(model.embed([prompt]), token_ids=prompt)
        assert hidden.shape == (1, len(prompt), 576) and hidden.dtype == torch.float32
        while True:
            token = int(model.logits(hidden)[0, -1].argmax())
            new.append(token)
            if token in model.client.eos_token_ids or len(new) == MAX_NEW:
                break
            hidden = session.step(model.embed([[token]]), token_ids=[token])
            assert hidden.shape == (1, 1, 576) and hidden.dtype == torch.float32
        assert session.position == len(prompt) + len(new) - 1
    assert new == reference(QUESTION, MAX_NEW)


def test_edited_hidden_states_go_through_as_they_are(model: RemoteModel, demo_model_dir: str) -> None:
    prompt = _prompt(model)
    plain = model.embed([prompt])
    edited = plain * 0.5
    edited[0, -1] += 0.1 * torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    outputs = []
    for hidden in (plain, edited):
        with model.inference_session(max_length=len(prompt)) as session:
            outputs.append(session.step(hidden))  # no token ids: fine while no node fails
    engine = SpanEngine.load(demo_model_dir, 0, model.client.manifest.num_blocks, device="cpu")
    engine.open_session("edited", max_length=len(prompt))
    # relative to the whole output: the node and this engine may each pick another weight layout (by
    # measurement), and reordered float sums move activations of ~100 by ~1e-4 after 30 blocks
    expected = engine.step("edited", edited, 0)
    assert float((outputs[1] - expected).norm() / expected.norm()) < 1e-5
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)  # the edit reached the nodes


def test_session_checks_its_input(model: RemoteModel) -> None:
    with model.inference_session(max_length=4) as session:
        with pytest.raises(InvalidInput, match="shape"):
            session.step(torch.zeros(1, 2, 100))
        with pytest.raises(InvalidInput, match="token_ids"):
            session.step(model.embed([[1, 2]]), token_ids=[1])
        session.step(model.embed([[1, 2, 3]]))  # without token ids: fine while no node fails
        with pytest.raises(InvalidInput, match="max_length"):
            session.step(model.embed([[1, 2]]))
        assert session.position == 3
    with pytest.raises(CoopError, match="closed"):
        session.step(model.embed([[1]]))


def test_the_coordinator_refuses_bad_steps_and_bad_keys(sdk_pool: SdkPool, model: RemoteModel) -> None:
    """What the SDK would never send, sent by hand: refused with a 4xx, and the session carries on."""
    headers = {"Authorization": f"Bearer {sdk_pool.key}"}
    body = {"max_length": 4, "model_hash": model.client.manifest.content_hash}
    for key in (None, "coop-not-a-key"):
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        refused = httpx.post(f"{sdk_pool.url}{SESSIONS}", json=body, headers=auth)
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
        with pytest.raises(ApiError, match="API key"):
            RemoteModel(model.client, sdk_pool.url, api_key=key)
    opened = httpx.post(f"{sdk_pool.url}{SESSIONS}", json=body, headers=headers)
    assert opened.status_code == 200, opened.text
    steps = f"{sdk_pool.url}{SESSIONS}/{opened.json()['session_id']}/steps"
    good = model.embed([[1, 2]])
    nan = good.clone()
    nan[0, 0, 0] = float("nan")
    for what, hidden, status in [
        ("shape", torch.zeros(1, 2, 100), 400),
        ("non-finite", nan, 400),
        ("bytes", torch.zeros(1, 4096, model.hidden_size), 413),  # far beyond the session's 4 tokens
    ]:
        response = httpx.post(steps, content=_step(hidden), headers=headers)
        assert response.status_code == status and what in response.json()["error"]["message"], response.text
    unknown = httpx.post(f"{sdk_pool.url}{SESSIONS}/{'0' * 32}/steps", content=_step(good), headers=headers)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "session_not_found")
    assert httpx.post(steps, content=_step(good, [1, 2]), headers=headers).status_code == 200
    assert httpx.delete(steps.removesuffix("/steps"), headers=headers).status_code == 204


def _step(hidden: torch.Tensor, token_ids: list[int] | None = None) -> bytes:
    return pb.RelayStep(hidden=tensor_to_proto(hidden), start_position=0, token_ids=token_ids or []).SerializeToString()


def test_close_leaves_no_threads_and_closes_the_sessions(sdk_pool: SdkPool, demo_model_dir: str) -> None:
    assert AutoDistributedModelForCausalLM is RemoteModel
    threads_before = set(threading.enumerate())
    model = AutoDistributedModelForCausalLM.from_pretrained(demo_model_dir, sdk_pool.url, api_key=sdk_pool.key)
    assert model.generate([1, 2, 3], max_new_tokens=2).shape[1] <= 5
    session = model.inference_session(max_length=8)  # left open: close() must release it
    session_url = f"{sdk_pool.url}{SESSIONS}/{session.session_id}"
    headers = {"Authorization": f"Bearer {sdk_pool.key}"}
    assert httpx.get(session_url, headers=headers).status_code == 200
    ours = [t for t in threading.enumerate() if t not in threads_before]
    assert any(t.name.startswith("coop-remote-model") for t in ours)  # the check below can see our threads
    model.close()
    model.close()  # idempotent
    with pytest.raises(CoopError, match="closed"):
        model.generate([1, 2, 3], max_new_tokens=2)
    assert [t for t in ours if t.is_alive()] == []
    assert httpx.get(session_url, headers=headers).status_code == 404


def test_session_fails_over_with_token_ids_and_refuses_without(
    sdk_pool: SdkPool, model: RemoteModel, reference: Callable[[str, int], list[int]]
) -> None:
    """Runs last: it kill -9s a node for blocks 15:30, leaving the other to serve the model."""
    prompt = _prompt(model)
    expected = reference(QUESTION, MAX_NEW)
    # three sessions over two nodes for 15:30: two of them share one, whatever the load balancing does
    sessions = [model.inference_session(max_length=len(prompt) + MAX_NEW) for _ in range(3)]
    by_node: dict[str, list[InferenceSession]] = {}
    for session in sessions:
        by_node.setdefault(session.route[1].node_id, []).append(session)
    victim, (with_ids, without_ids, *_) = next((node, s) for node, s in by_node.items() if len(s) >= 2)
    survivor = ({"node-b", "node-b2"} - {victim}).pop()
    try:
        first = with_ids.step(model.embed([prompt]), token_ids=prompt)
        without_ids.step(model.embed([prompt]))
        sdk_pool.pool.nodes[victim].kill_hard()

        token = int(model.logits(first)[0, -1].argmax())
        hidden = with_ids.step(model.embed([[token]]), token_ids=[token])
        assert with_ids.failovers == 1 and [h.node_id for h in with_ids.route] == ["node-a", survivor]
        assert [token, int(model.logits(hidden)[0, -1].argmax())] == expected[:2]

        with pytest.raises(ReplayUnavailable, match="without token_ids"):
            without_ids.step(model.embed([[token]]))
        with pytest.raises(CoopError, match="closed"):
            without_ids.step(model.embed([[token]]))
    finally:
        for session in sessions:
            session.close()
