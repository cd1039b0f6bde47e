"""e2e fixtures: one reference (single-process) answer per prompt, shared by the e2e modules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine
from coop.pipeline.generation import collect_tokens
from coop.pipeline.local import LocalChain
from coop.pipeline.sampling import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def demo_client(demo_model_dir: str) -> ClientPart:
    return ClientPart.load(demo_model_dir, device="cpu")


def single_process_reference(model_dir: str, client: ClientPart) -> Callable[[str, int], list[int]]:
    """reference(question, max_tokens) -> greedy token ids of the whole model `model_dir` in this process."""
    engine = SpanEngine.load(model_dir, 0, client.manifest.num_blocks, device="cpu")
    cache: dict[tuple[str, int], list[int]] = {}

    def run(question: str, max_tokens: int) -> list[int]:
        key = (question, max_tokens)
        if key not in cache:
            prompt = client.encode_chat([{"role": "user", "content": question}])
            chain = LocalChain([engine], max_length=len(prompt) + max_tokens)
            cache[key] = asyncio.run(collect_tokens(client, chain, prompt, SamplingParams(max_tokens=max_tokens)))
            asyncio.run(chain.close())
        return cache[key]

    return run


@pytest.fixture(scope="session")
def reference(demo_model_dir: str, demo_client: ClientPart) -> Callable[[str, int], list[int]]:
    """reference(question, max_tokens) -> greedy token ids of the whole demo model in this process."""
    return single_process_reference(demo_model_dir, demo_client)
