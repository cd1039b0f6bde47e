"""The decoding loop: embed, run every block through a chain of spans, sample, repeat.

`Chain` is whatever runs all of the model's blocks for one session: engines in this process
(`coop.pipeline.local.LocalChain`, the reference path) or nodes across the network. The loop is the same for both,
which is what makes "distributed output equals local output" checkable.

Multi-token steps (greedy requests, on chains with `draft_tokens` > 0): each step carries the token
just chosen plus up to `draft_tokens` drafts (`coop.pipeline.drafts`); the chain runs them in one pass,
and the loop keeps the drafts that greedy decoding agrees with, position by position, plus the model's
own next token after them. The next step starts right after the kept tokens, so the chain drops the
rejected drafts from its caches first. Each kept token is the argmax given the kept tokens before it,
exactly as with one-token steps, so the output is the same tokens, in fewer round trips.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import torch

from coop.errors import InvalidInput, SpanOutOfRange
from coop.model.client_part import ClientPart
from coop.pipeline.drafts import NgramDrafter
from coop.pipeline.heads import head_batcher
from coop.pipeline.sampling import SamplingParams, make_generator
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

    @property
    def draft_tokens(self) -> int:
        """Draft tokens a greedy step may carry for verification; 0: one-token steps."""
        ...

    async def step(self, hidden: torch.Tensor, start_position: int, token_ids: Sequence[int]) -> torch.Tensor:
        """Hidden states [1, n, h] of tokens start_position.. -> hidden states after the last block.

        `token_ids` are all the session's tokens up to and including this step's: a remote chain
        replays the first start_position of them on a new route when a node fails. A chain with
        `draft_tokens` > 0 also takes a start_position below the positions it has stepped: it drops the
        cached tokens from there on (rejected drafts) before the step.
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
    heads = head_batcher(client)
    drafter = NgramDrafter(chain.draft_tokens) if params.greedy and chain.draft_tokens > 0 else None
    tokens = list(prompt_ids)  # every token kept so far; the chain's caches hold all but the last
    hidden = await chain.step(client.embed(torch.tensor([tokens])), 0, tokens)
    drafts: list[int] = []  # the drafts the last step carried after its first token
    produced = 0
    while True:
        # The LM head is the heaviest work a coordinator does per token (~7-10 ms of CPU on the demo
        # model): it runs in a worker thread, beside the event loop, in one call with other sessions' heads.
        kept = await heads.kept_tokens(hidden, drafts, params, generator)
        if drafter is not None and drafts:
            drafter.update(len(drafts), len(kept) - 1)
        for token in kept:
            produced += 1
            yield token
            if token in client.eos_token_ids or produced == params.max_tokens:
                return
        tokens.extend(kept)
        # Never more drafts than tokens left to produce: the session's caches are sized for max_tokens.
        drafts = drafter.propose(tokens, params.max_tokens - produced - 1) if drafter is not None else []
        step_ids = [tokens[-1], *drafts]
        hidden = await chain.step(client.embed(torch.tensor([step_ids])), len(tokens) - 1, tokens + drafts)


async def collect_tokens(
    client: ClientPart, chain: Chain, prompt_ids: Sequence[int], params: SamplingParams
) -> list[int]:
    return [token async for token in generate_tokens(client, chain, prompt_ids, params)]
