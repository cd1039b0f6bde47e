"""DHT + three node processes + a coordinator on 127.0.0.1, serving the demo model over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest
import torch

from coop.client import Client
from coop.launcher import LocalPool as Pool
from coop.model.client_part import ClientPart
from coop.node.client import node_info
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from coop.wire.tensors import tensor_to_proto
from tests.pools import running_pool

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
SPANS = {"node-a": "0:10", "node-b": "10:20", "node-c": "20:30"}


@pytest.fixture(scope="module")
def pool(demo_model_dir: str) -> Iterator[Pool]:
    with running_pool(demo_model_dir, SPANS) as pool:
        yield pool


def _chat(url: str, question: str, max_tokens: int, **extra: object) -> dict[str, object]:
    body = {
        "model": "smollm2-demo",
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
        **extra,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _counters(pool: Pool) -> dict[str, pb.NodeInfo.Counters]:
    return {name: node_info(node.ready["endpoint"]).counters for name, node in pool.nodes.items()}


def test_greedy_chat_equals_single_process(pool: Pool, reference: Callable[[str, int], list[int]]) -> None:
    body = _chat(pool.url, QUESTION, 24)
    coop = body["coop"]
    assert isinstance(coop, dict)
    assert coop["token_ids"] == reference(QUESTION, 24)
    assert [hop["node_id"] for hop in coop["route"]] == ["node-a", "node-b", "node-c"]
    assert "Paris" in body["choices"][0]["message"]["content"]  # type: ignore[index]


def test_each_step_crosses_each_node_once(pool: Pool) -> None:
    before = _counters(pool)
    steps = len(_chat(pool.url, "Name a colour.", 12)["coop"]["token_ids"])  # type: ignore[index]
    after = _counters(pool)
    delta = {
        name: (
            after[name].steps_run - before[name].steps_run,
            after[name].pushes_sent - before[name].pushes_sent,
            after[name].results_sent - before[name].results_sent,
        )
        for name in SPANS
    }
    # (steps run, pushed to the next node, returned to the coordinator)
    assert delta == {"node-a": (steps, steps, 0), "node-b": (steps, steps, 0), "node-c": (steps, 0, steps)}


def test_openai_package_plain_and_stream(pool: Pool) -> None:
    oai = openai.OpenAI(base_url=f"{pool.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    plain = oai.chat.completions.create(model="smollm2-demo", messages=messages, temperature=0, max_tokens=16)  # type: ignore[arg-type]
    stream = oai.chat.completions.create(
        model="smollm2-demo",
        messages=messages,
        temperature=0,
        max_tokens=16,
        stream=True,  # type: ignore[arg-type]
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert plain.choices[0].message.content == streamed
    assert "Paris" in streamed
    assert plain.usage is not None and plain.usage.completion_tokens > 0


def test_eight_concurrent_requests(
    pool: Pool, reference: Callable[[str, int], list[int]], demo_client: ClientPart
) -> None:
    questions = ["What is the capital of France?", "Name a colour.", "What is 2+2?", "Say hello."]
    expected = {q: demo_client.decode(reference(q, 16)) for q in questions}
    client = Client(pool.url, timeout_s=300)

    def ask(i: int) -> tuple[str, str]:
        question = questions[i % len(questions)]
        messages = [{"role": "user", "content": question}]
        if i % 2:
            return question, "".join(client.chat_stream(messages, temperature=0, max_tokens=16))
        return question, client.chat(messages, temperature=0, max_tokens=16).text

    with ThreadPoolExecutor(max_workers=8) as pool_threads:
        answers = list(pool_threads.map(ask, range(8)))
    assert len(answers) == 8
    for question, text in answers:
        assert text == expected[question]


def test_bad_http_input(pool: Pool) -> None:
    url = f"{pool.url}/v1/chat/completions"
    cases = [
        ({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}, 404),
        ({"model": "smollm2-demo", "messages": []}, 400),
        ({"model": "smollm2-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**7}, 400),
    ]
    for body, status in cases:
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == status, response.text
        assert response.json()["error"]["message"]
    malformed = httpx.post(url, content=b'{"model": ', headers={"content-type": "application/json"}, timeout=30)
    assert malformed.status_code == 400 and "error" in malformed.json()


def test_hostile_peer_input_gets_clear_errors(pool: Pool) -> None:
    endpoint = pool.nodes["node-b"].ready["endpoint"]
    with grpc.insecure_channel(endpoint) as channel:
        stub = coop_pb2_grpc.NodeStub(channel)
        hidden = tensor_to_proto(torch.zeros(1, 1, 576))
        ack = stub.Forward(pb.StepRequest(session_id="nobody", step_id=1, hidden=hidden), timeout=10)
        assert ack.error.code == pb.UNKNOWN_SESSION and "nobody" in ack.error.message

        # a real open session, sent a tensor of the wrong width
        controls: list[pb.SessionControl] = [
            pb.SessionControl(open=pb.SessionControl.Open(session_id="probe", max_length=8, start=10, end=20))
        ]
        done = threading.Event()

        def requests() -> Iterator[pb.SessionControl]:
            yield from controls
            done.wait(30)

        events = stub.Session(requests(), timeout=30)
        assert next(events).WhichOneof("kind") == "opened"
        ready = pool.nodes["node-b"].ready
        me = pb.Hop(endpoint=endpoint, start=10, end=20, node_id=ready["node_id"], institution=ready["institution"])
        route = pb.Route(session_id="probe", hops=[me]).SerializeToString()
        wrong = tensor_to_proto(torch.zeros(1, 1, 100))
        ack = stub.Forward(pb.StepRequest(session_id="probe", step_id=1, hidden=wrong, route=route), timeout=10)
        assert ack.error.code == pb.INVALID_TENSOR and "576" in ack.error.message
        garbage = pb.Tensor(data=b"\x00" * 7, dtype="float32", shape=[1, 1, 576])
        ack = stub.Forward(pb.StepRequest(session_id="probe", step_id=2, hidden=garbage, route=route), timeout=10)
        assert ack.error.code == pb.INVALID_TENSOR
        # a route this node is not on (or twice on), a route of another session, no route at all
        elsewhere = pb.Hop(endpoint="10.9.9.9:1", start=10, end=20, node_id="someone-else")
        for bad in (
            pb.Route(session_id="probe", hops=[elsewhere]),
            pb.Route(session_id="probe", hops=[me, me]),
            pb.Route(session_id="other", hops=[me]),
            pb.Route(session_id="probe"),
        ):
            step = pb.StepRequest(session_id="probe", step_id=3, hidden=hidden, route=bad.SerializeToString())
            assert stub.Forward(step, timeout=10).error.code == pb.INVALID_REQUEST, bad
        done.set()
        events.cancel()
    # the node keeps serving everyone else
    assert "Paris" in str(_chat(pool.url, QUESTION, 12)["choices"])


def test_health_and_models(pool: Pool) -> None:
    assert httpx.get(f"{pool.url}/health", timeout=10).json()["status"] == "ok"
    models = httpx.get(f"{pool.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["smollm2-demo"]
