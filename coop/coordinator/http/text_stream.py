"""From token ids to text: incremental detokenisation, stop sequences, and the generation events.

Streamed and non-streamed responses are both built from `run_generation`'s events, so their text
is identical by construction; the chain is always closed, even when the client goes away. The
text work runs in `TextWorkers` threads, never on the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar, TypeVarTuple, cast

import anyio
import anyio.to_thread

from coop.coordinator.http.protocol import (
    CoopExtras,
    FinishReason,
    RouteHop,
    SamplingUsed,
    Usage,
)
from coop.pipeline.backend import Backend
from coop.pipeline.charge import UNMETERED, Charge
from coop.pipeline.generation import Chain, generate_tokens
from coop.pipeline.sampling import SamplingParams

log = logging.getLogger(__name__)

T = TypeVar("T")
Args = TypeVarTuple("Args")


class TextWorkers:
    """Threads for the text work of requests: tokenizing, detokenizing, matching stop strings.

    Its cost grows with what a client sends (a long prompt, many stop strings) and with the length
    of the completion; on the event loop, one such request would stall every other stream and the
    admin view. A request does one piece at a time, so it holds at most one thread.
    """

    def __init__(self, threads: int) -> None:
        self._limiter = anyio.CapacityLimiter(threads)

    async def run(self, work: Callable[[*Args], T], *args: *Args) -> T:
        return await anyio.to_thread.run_sync(work, *args, limiter=self._limiter)


class IncrementalDetokenizer:
    """Token ids so far -> the new text that is safe to show, with stop sequences applied.

    It decodes the whole completion each time and emits the suffix beyond what it already
    emitted: a token's text depends on its neighbours (byte-level pieces, leading spaces), so
    decoding tokens one by one would be wrong. It holds back a trailing U+FFFD (a multi-byte
    character whose remaining bytes are still to come) and any tail that could still grow into
    a stop sequence. Decoding everything is O(n) per token; fine at these lengths, and the place
    to add prefix/read offsets if it ever shows up in a profile.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, token_ids: list[int]) -> str:
        full = self._decode(token_ids)
        floor = len(self.text)
        hit = self._find_stop(full)
        if hit is not None:
            self.stopped = True
            return self._emit(full, max(hit, floor))  # the text is cut before the stop string
        end = _strip_partial_char(full, floor)
        end -= self._stop_prefix_length(full[:end], floor)
        return self._emit(full, end)

    def finish(self, token_ids: list[int]) -> str:
        """The generation ended (EOS or length): release held-back text but a partial character."""
        full = self._decode(token_ids)
        return self._emit(full, _strip_partial_char(full, len(self.text)))

    def _emit(self, full: str, end: int) -> str:
        # Decoding is prefix-stable for the tokenizers we serve; if it ever is not, the emitted
        # text cannot be taken back, so we continue from the same character offset.
        delta = full[len(self.text) : end] if end > len(self.text) else ""
        self.text += delta
        return delta

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_length(self, text: str, floor: int) -> int:
        """Length of the longest tail of text (beyond floor) that is a proper prefix of a stop."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text) - floor), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


def _strip_partial_char(text: str, floor: int) -> int:
    end = len(text)
    while end > floor and text[end - 1] == "\ufffd":
        end -= 1
    return end


# -- the generation core ----------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The chain is open: from here on, failures are reported inside the stream."""


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    token_ids: list[int]  # every generated token, EOS included
    prompt_tokens: int
    route: list[RouteHop]
    sampling: SamplingParams

    @property
    def usage(self) -> Usage:
        completion = len(self.token_ids)
        return Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=completion, total_tokens=self.prompt_tokens + completion
        )

    @property
    def extras(self) -> CoopExtras:
        used = SamplingUsed(
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            top_k=self.sampling.top_k,
            seed=self.sampling.seed,
        )
        return CoopExtras(token_ids=self.token_ids, route=self.route, sampling=used)


GenerationEvent = Started | TextDelta | Finished


async def run_generation(
    backend: Backend, text: TextWorkers, prompt_ids: list[int], params: SamplingParams, charge: Charge = UNMETERED
) -> AsyncGenerator[GenerationEvent, None]:
    """Started, then text deltas, then Finished. The chain is closed however this ends; `text` runs
    the detokenizer."""
    chain = await backend.open_chain(len(prompt_ids) + params.max_tokens, charge=charge)
    try:
        yield Started()
        client = backend.client
        detokenizer = IncrementalDetokenizer(client.decode, params.stop)
        token_ids: list[int] = []
        finish_reason: FinishReason = "length"
        # generate_tokens is an async generator (typed as an iterator): close it when we stop early
        token_gen = cast(AsyncGenerator[int, None], generate_tokens(client, chain, prompt_ids, params))
        async with aclosing(token_gen) as tokens:
            async for token in tokens:
                token_ids.append(token)
                if token in client.eos_token_ids:
                    finish_reason = "stop"
                    break
                delta = await text.run(detokenizer.push, token_ids)
                if delta:
                    yield TextDelta(delta)
                if detokenizer.stopped:
                    finish_reason = "stop"
                    break
        if not detokenizer.stopped:
            text_ids = token_ids[:-1] if token_ids and token_ids[-1] in client.eos_token_ids else token_ids
            tail = await text.run(detokenizer.finish, text_ids)
            if tail:
                yield TextDelta(tail)
        yield Finished(finish_reason, token_ids, len(prompt_ids), route_hops(chain), params)
    finally:
        await close_quietly(chain)


def route_hops(chain: Chain) -> list[RouteHop]:
    """The route a chain runs on now, as responses show it."""
    return [
        RouteHop(
            node_id=h.node_id,
            institution=h.institution,
            endpoint=h.endpoint,
            start=h.start,
            end=h.end,
            failovers=chain.failovers,
        )
        for h in chain.hops
    ]


async def close_quietly(chain: Chain) -> None:
    """Close even when the request was cancelled (client gone), and never mask the real error."""
    try:
        with anyio.CancelScope(shield=True):
            await chain.close()
    except Exception:
        log.warning("closing a chain failed", exc_info=True)


async def collect_text(events: AsyncGenerator[GenerationEvent, None]) -> tuple[str, Finished]:
    parts: list[str] = []
    async with aclosing(events):
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                return "".join(parts), event
    raise RuntimeError("generation ended without a Finished event")  # pragma: no cover


# -- the endpoints' logic ---------------------------------------------------------------------
