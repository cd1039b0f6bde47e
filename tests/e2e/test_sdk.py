"""The research SDK: RemoteModel drives a real swarm (DHT + two node processes) with no coordinator."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import psutil
import pytest
import torch

from coop.client import AutoDistributedModelForCausalLM, InferenceSession, RemoteModel, ReplayUnavailable
from coop.errors import CoopError, InvalidInput
from coop.launcher import LocalPool as Pool

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
MAX_NEW = 16


@pytest.fixture(scope="module")
def pool(demo_model_dir: str) -> Iterator[Pool]:
    pool = Pool(demo_model_dir)
    try:
        pool.start_dht()
        # node-b2 is a spare for blocks 15:30, started alongside (no extra wall time), for the failover test
        pool.start_nodes({"node-a": "0:15", "node-b": "15:30", "node-b2": "15:30"})
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def model(pool: Pool, demo_model_dir: str) -> Iterator[RemoteModel]:
    with RemoteModel.from_pretrained(demo_model_dir, [pool.peer]) as model:
        yield model


def _prompt(model: RemoteModel) -> list[int]:
    return model.client.encode_chat([{"role": "user", "content": QUESTION}])


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


def _shared_threads() -> set[threading.Thread]:
    """Threads hivemind and multiprocessing start once per process (on the first DHT) and keep for good."""
    from multiprocessing import resource_sharer

    from hivemind.utils.mpfuture import MPFuture

    sharer = getattr(resource_sharer, "_resource_sharer", None)
    shared = {getattr(MPFuture, "_pipe_waiter_thread", None), getattr(sharer, "_thread", None)}
    return {t for t in shared if isinstance(t, threading.Thread)}


def test_close_leaves_no_threads_or_processes(pool: Pool, demo_model_dir: str) -> None:
    assert AutoDistributedModelForCausalLM is RemoteModel
    threads_before = set(threading.enumerate())
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    model = AutoDistributedModelForCausalLM.from_pretrained(demo_model_dir, [pool.peer])
    assert model.generate([1, 2, 3], max_new_tokens=2).shape[1] <= 5
    model.inference_session(max_length=8)  # left open: close() must release it
    ours = [t for t in threading.enumerate() if t not in threads_before and t not in _shared_threads()]
    assert any(t.name.startswith("coop-remote-model") for t in ours)  # the check below can see our threads
    dht = [p for p in psutil.Process().children(recursive=True) if p.pid not in children_before]
    assert dht  # the DHT process and its p2pd
    model.close()
    model.close()  # idempotent
    with pytest.raises(CoopError, match="closed"):
        model.generate([1, 2, 3], max_new_tokens=2)
    assert [t for t in ours if t.is_alive()] == []
    assert [t for t in threading.enumerate() if t not in threads_before and t not in _shared_threads()] == []
    assert [p for p in dht if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []


def test_session_fails_over_with_token_ids_and_refuses_without(
    pool: Pool, model: RemoteModel, reference: Callable[[str, int], list[int]]
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
        pool.nodes[victim].kill_hard()

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
