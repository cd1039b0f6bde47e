"""Attacks on a pool, carried out for real: each module is one attacker and what must stop them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine
from coop.pipeline.generation import collect_tokens
from coop.pipeline.local import LocalChain
from coop.pipeline.sampling import SamplingParams
from tests.e2e.conftest import demo_client, reference

__all__ = ["demo_client", "reference", "tiny_reference"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tiny_reference(tiny_chat_model_dir: str) -> Callable[[str, int], list[int]]:
    """tiny_reference(question, max_tokens) -> greedy token ids of the tiny chat model in this process."""
    client = ClientPart.load(tiny_chat_model_dir, device="cpu")
    engine = SpanEngine.load(tiny_chat_model_dir, 0, client.manifest.num_blocks, device="cpu")

    def run(question: str, max_tokens: int) -> list[int]:
        prompt = client.encode_chat([{"role": "user", "content": question}])
        chain = LocalChain([engine], max_length=len(prompt) + max_tokens)
        try:
            return asyncio.run(collect_tokens(client, chain, prompt, SamplingParams(max_tokens=max_tokens)))
        finally:
            asyncio.run(chain.close())

    return run
