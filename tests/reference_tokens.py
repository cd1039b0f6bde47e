"""Greedy reference tokens straight through a LocalChain, without HTTP or nodes: what a served answer must match."""

from __future__ import annotations

import asyncio

from coop.pipeline.generation import collect_tokens
from coop.pipeline.local import LocalBackend, LocalChain
from coop.pipeline.sampling import SamplingParams


def local_tokens(backend: LocalBackend, prompt: list[int], max_tokens: int) -> list[int]:
    async def run() -> list[int]:
        chain = LocalChain(backend.engines, max_length=len(prompt) + max_tokens)
        try:
            return await collect_tokens(backend.client, chain, prompt, SamplingParams(max_tokens=max_tokens))
        finally:
            await chain.close()

    return asyncio.run(run())
