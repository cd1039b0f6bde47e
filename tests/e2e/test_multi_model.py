"""Two models in one pool, with real processes: one coordinator serves both, each through its own nodes.

Alpha's node serves the demo model whole; Beta's two nodes serve the tiny chat model (blocks 0:2 and
2:4); the coordinator (Coord, with the pool directory) serves both and books every receipt; Gamma's
API key pays. Each model answers with the tokens of its own single-process run, each receipt is
booked at its own model's FLOPs, and an SDK session runs on the model of its content hash. When one
of Beta's nodes stops, the tiny model is reported half covered and refused with a 503, while the
demo model still answers.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from coop.client import RemoteModel
from coop.launcher import COOP, LocalPool
from coop.ledger.database import LEDGER_FILE, sqlite_url
from coop.ledger.store import Ledger
from coop.model.manifest import Manifest
from coop.pipeline.generation import collect_tokens
from coop.pipeline.local import LocalBackend
from coop.pipeline.sampling import SamplingParams
from coop.pool.registry import create_api_key
from coop.swarm.node_key import NodeKey
from tests.pools import make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
MAX_TOKENS = 8
WAIT_S = 60.0


@dataclass
class TwoModels:
    pool: LocalPool
    pool_dir: Path
    key: str
    admin_token: str
    demo: Manifest
    tiny: Manifest

    def chat(self, model: str) -> httpx.Response:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.post(f"{self.pool.url}/v1/chat/completions", json=body, headers=headers, timeout=120)

    def models(self) -> dict[str, dict[str, Any]]:
        response = httpx.get(f"{self.pool.url}/v1/models", headers={"Authorization": f"Bearer {self.key}"}, timeout=30)
        assert response.status_code == 200, response.text
        return {card["id"]: card["coop"] for card in response.json()["data"]}


@pytest.fixture(scope="module")
def two_models(
    demo_model_dir: str, tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoModels]:
    pool_dir = tmp_path_factory.mktemp("two-models") / "pool"
    disk = make_pool(pool_dir, "Two models", ("Alpha", "Beta", "Gamma"), coordinators=("Coord",))
    bundles = disk.bundles
    pool = LocalPool(demo_model_dir)
    try:
        pool.start_dht()
        pool.start_nodes({"demo-0": "0:30"}, {"demo-0": bundles["Alpha"]})
        tiny_members = {"tiny-0": bundles["Beta"], "tiny-1": bundles["Beta"]}
        pool.start_nodes({"tiny-0": "0:2", "tiny-1": "2:4"}, tiny_members, model_dir=tiny_chat_model_dir)
        disk.start_coordinator(pool, "Coord", ["--model", tiny_chat_model_dir, "--receipt-interval-s", "0.3"])
        demo, tiny = Manifest.load(demo_model_dir), Manifest.load(tiny_chat_model_dir)
        yield TwoModels(pool, pool_dir, create_api_key(pool_dir, "Gamma"), disk.admin_token, demo, tiny)
    finally:
        pool.stop()


@functools.cache
def _single_process_tokens(model_dir: str) -> list[int]:
    backend = LocalBackend(model_dir)
    prompt = backend.client.encode_chat([{"role": "user", "content": QUESTION}])

    async def run() -> list[int]:
        chain = await backend.open_chain(len(prompt) + MAX_TOKENS)
        try:
            return await collect_tokens(backend.client, chain, prompt, SamplingParams(max_tokens=MAX_TOKENS))
        finally:
            await chain.close()

    return asyncio.run(run())


def test_both_models_are_listed_covered(two_models: TwoModels) -> None:
    models = two_models.models()
    assert list(models) == [two_models.demo.name, two_models.tiny.name]  # the first --model is the default
    assert models[two_models.demo.name] == {
        "covered": True,
        "coverage": 1.0,
        "num_blocks": 30,
        "missing_blocks": [],
        "default": True,
    }
    assert models[two_models.tiny.name]["covered"] and not models[two_models.tiny.name]["default"]


def test_each_model_answers_with_its_single_process_tokens(
    two_models: TwoModels, tiny_chat_model_dir: str, reference: Callable[[str, int], list[int]]
) -> None:
    answers = {}
    for manifest in (two_models.demo, two_models.tiny):
        response = two_models.chat(manifest.name)
        assert response.status_code == 200, response.text
        answers[manifest.name] = response.json()
        assert answers[manifest.name]["model"] == manifest.name
    assert answers[two_models.demo.name]["coop"]["token_ids"] == reference(QUESTION, MAX_TOKENS)
    assert answers[two_models.tiny.name]["coop"]["token_ids"] == _single_process_tokens(tiny_chat_model_dir)
    routes = {name: {hop["node_id"] for hop in answer["coop"]["route"]} for name, answer in answers.items()}
    assert routes == {two_models.demo.name: {"demo-0"}, two_models.tiny.name: {"tiny-0", "tiny-1"}}


def test_each_model_s_receipts_are_booked_at_its_own_flops(two_models: TwoModels) -> None:
    manifests = {m.content_hash: m for m in (two_models.demo, two_models.tiny)}
    nodes = {"demo-0": two_models.demo.content_hash, "tiny-0": two_models.tiny.content_hash}
    nodes["tiny-1"] = two_models.tiny.content_hash
    ledger = Ledger.open(sqlite_url(two_models.pool_dir / LEDGER_FILE))
    try:
        receipts = wait_for(
            "receipts of every node of both models",
            lambda: (found := ledger.receipts()) and {r.node_id for r in found} == set(nodes) and found,
            WAIT_S,
        )
        for receipt in receipts:
            assert receipt.model_hash == nodes[receipt.node_id]
            seen = ledger.observation(receipt.session_id, NodeKey(receipt.provider, receipt.node_id))
            assert seen is not None and seen.model_hash == receipt.model_hash  # the coordinator named the model
            span_flops = manifests[receipt.model_hash].span_flops_per_token(receipt.start_block, receipt.end_block)
            assert receipt.flops == (receipt.prefill_tokens + receipt.decode_tokens) * span_flops > 0
            assert receipt.consumer == "Gamma"
    finally:
        ledger.close()
    verify = subprocess.run(
        [*COOP, "ledger", "verify", "--pool", str(two_models.pool_dir)], capture_output=True, text=True, timeout=120
    )
    assert verify.returncode == 0 and "ledger OK" in verify.stdout, verify.stdout + verify.stderr


def test_admin_overview_has_a_coverage_map_per_model(two_models: TwoModels) -> None:
    headers = {"Authorization": f"Bearer {two_models.admin_token}"}
    overview = httpx.get(f"{two_models.pool.url}/admin/api/overview", headers=headers, timeout=30).json()
    maps = {m["name"]: _coverage(m) for m in overview["models"]}
    assert maps == {
        two_models.demo.name: (30, [], ["demo-0"]),
        two_models.tiny.name: (4, [], ["tiny-0", "tiny-1"]),
    }


def _coverage(card: dict[str, Any]) -> tuple[int, list[int], list[str]]:
    """A model's coverage map on the admin overview: blocks, those uncovered, and its nodes' ids."""
    return card["num_blocks"], card["blocks_uncovered"], sorted(NodeKey.parse(k).node_id for k in card["node_keys"])


def test_sdk_sessions_run_on_the_model_of_their_content_hash(two_models: TwoModels, tiny_chat_model_dir: str) -> None:
    with RemoteModel.from_pretrained(tiny_chat_model_dir, two_models.pool.url, api_key=two_models.key) as model:
        prompt = model.client.encode_chat([{"role": "user", "content": QUESTION}])
        out = model.generate(prompt, max_new_tokens=MAX_TOKENS)[0, len(prompt) :].tolist()
    assert out == _single_process_tokens(tiny_chat_model_dir)


def test_a_model_whose_nodes_left_is_refused_and_the_other_still_answers(two_models: TwoModels) -> None:
    two_models.pool.nodes["tiny-1"].stop()
    tiny = two_models.tiny.name
    wait_for("the tiny model to be reported uncovered", lambda: not two_models.models()[tiny]["covered"], WAIT_S)
    assert two_models.models()[tiny] == {
        "covered": False,
        "coverage": 0.5,
        "num_blocks": 4,
        "missing_blocks": [[2, 4]],
        "default": False,
    }
    refused = two_models.chat(tiny)
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "route_unavailable"
    assert f"model '{tiny}' is 50% covered" in error["message"] and "2:4" in error["message"]
    assert two_models.chat(two_models.demo.name).status_code == 200
    assert two_models.models()[two_models.demo.name]["covered"]
