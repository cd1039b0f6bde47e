"""An int8-quantized demo model served by three node processes: greedy tokens equal its single-process run."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from coop.launcher import LocalPool
from coop.model.client_part import ClientPart
from coop.model.manifest import Manifest
from coop.model.prepare import prepare
from tests.conftest import DEMO_MODEL_DIR
from tests.e2e.conftest import single_process_reference
from tests.pools import running_pool

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
MAX_TOKENS = 16
SPANS = {"node-a": "0:10", "node-b": "10:20", "node-c": "20:30"}


@pytest.fixture(scope="module")
def int8_demo_dir() -> str:
    """Prepared once per machine beside the float demo model, like it (a no-op when up to date)."""
    path = f"{DEMO_MODEL_DIR}-int8"
    prepare("smollm2-demo", path, quantize="int8", quiet=True)
    return path


@pytest.fixture(scope="module")
def pool(int8_demo_dir: str) -> Iterator[LocalPool]:
    with running_pool(int8_demo_dir, SPANS) as pool:
        yield pool


def test_int8_swarm_equals_its_single_process_run(pool: LocalPool, int8_demo_dir: str, demo_model_dir: str) -> None:
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    response = httpx.post(f"{pool.url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    coop = response.json()["coop"]
    assert [hop["node_id"] for hop in coop["route"]] == list(SPANS)
    client = ClientPart.load(int8_demo_dir, device="cpu")
    assert coop["token_ids"] == single_process_reference(int8_demo_dir, client)(QUESTION, MAX_TOKENS)
    # a model of its own in the pool, with the float model's FLOPs (credits) per token
    quantized, plain = Manifest.load(int8_demo_dir), Manifest.load(demo_model_dir)
    assert quantized.quantization == "int8" and quantized.content_hash != plain.content_hash
    assert quantized.total_flops_per_token == plain.total_flops_per_token
