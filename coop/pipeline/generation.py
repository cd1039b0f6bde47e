"""The decoding loop: embed, run every block through a chain of spans, sample, repeat.

`Chain` is whatever runs all of the model's blocks for one session: engines in this process
(`coop.pipeline.local.LocalChain`, the reference path) or nodes across the network. The loop is the same for both,
which is what makes "distributed output equals local output" checkable.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import torch

from coop.errors import InvalidInput, SpanOutOfRange
from coop.model.client_part import ClientPart
from coop.pipeline.sampling import SamplingParams, make_generator, sample_token
from coop.swarm.routing import Hop


class Chain(Protocol):
    @property
    def hops(self) -> list[Hop]:
        """The route the session runs on now (one hop per span)."""
        ...

    @property
    def failovers(self) -> int:
        """How many times the session moved to another route."""
        ...

    async def step(self, hidden: torch.Tensor, start_position: int, token_ids: Sequence[int]) -> torch.Tensor:
        """Hidden states [1, n, h] of tokens start_position.. -> hidden states after the last block.

        `token_ids` are all the session's tokens up to and including this step's: a remote chain
        replays them on a new route when a node fails.
        """
        ...

    async def close(self) -> None: ...


def check_spans_tile(spans: Sequence[tuple[int, int]], num_blocks: int) -> None:
    """Spans must cover blocks 0..num_blocks-1 in order, each exactly once."""
    if not spans:
        raise SpanOutOfRange("a chain needs at least one span")
    expected = 0
    for start, end in spans:
        if start != expected or end <= start:
            raise SpanOutOfRange(f"spans must be contiguous from 0: got {start}:{end} after {expected}")
        expected = end
    if expected != num_blocks:
        raise SpanOutOfRange(f"spans end at block {expected}, the model has {num_blocks}")


async def generate_tokens(
    client: ClientPart, chain: Chain, prompt_ids: Sequence[int], params: SamplingParams
) -> AsyncIterator[int]:
    """Yield sampled token ids, the end-of-sequence token included, until EOS or max_tokens."""
    if not prompt_ids:
        raise InvalidInput("the prompt must contain at least one token")
    generator = make_generator(params)
    tokens = list(prompt_ids)
    hidden = await chain.step(client.embed(torch.tensor([tokens])), 0, tokens)
    for produced in range(1, params.max_tokens + 1):
        # The LM head is the heaviest work a coordinator does per token (~10 ms of CPU on the demo
        # model): in a worker thread it runs beside the event loop and the other sessions' heads.
        token = await asyncio.to_thread(_next_token, client, hidden, params, generator)
        yield token
        if token in client.eos_token_ids or produced == params.max_tokens:
            return
        tokens.append(token)
        hidden = await chain.step(client.embed(torch.tensor([[token]])), len(tokens) - 1, tokens)


def _next_token(
    client: ClientPart, hidden: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    return sample_token(client.logits(hidden)[0, -1], params, generator)


async def collect_tokens(
    client: ClientPart, chain: Chain, prompt_ids: Sequence[int], params: SamplingParams
) -> list[int]:
    return [token async for token in generate_tokens(client, chain, prompt_ids, params)]
