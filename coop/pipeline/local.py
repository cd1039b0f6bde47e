"""Every block in this process: the reference path that every networked path is tested against.

`LocalBackend` serves the HTTP API in tests and `coop generate`; `LocalChain` runs one session
through engines whose spans together cover the model.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from coop.errors import SessionError
from coop.model.client_part import ClientPart
from coop.model.engine import DEFAULT_CACHE_BUDGET_BYTES, SpanEngine
from coop.model.manifest import Manifest
from coop.pipeline.charge import UNMETERED, Charge
from coop.pipeline.generation import Chain, check_spans_tile
from coop.swarm.routing import Hop


class LocalChain:
    """Engines in this process whose spans together cover every block, in order.

    Block compute runs in worker threads, so a server's event loop stays free while it runs;
    engines lock their own compute, so concurrent sessions simply interleave.
    """

    def __init__(self, engines: Sequence[SpanEngine], *, max_length: int, draft_tokens: int = 0) -> None:
        check_spans_tile([(e.start, e.end) for e in engines], engines[0].manifest.num_blocks if engines else 0)
        self.engines = list(engines)
        self.hops = [Hop("local", str(e.device), e.start, e.end) for e in self.engines]
        self.failovers = 0
        self.draft_tokens = draft_tokens
        self._stepped = 0  # positions the engines' caches hold, rejected drafts included
        self.session_id = uuid.uuid4().hex
        opened: list[SpanEngine] = []
        try:
            for engine in self.engines:
                engine.open_session(self.session_id, max_length=max_length)
                opened.append(engine)
        except SessionError:
            for engine in opened:  # a refused open (e.g. cache budget) must not keep the others' reservations
                engine.evict(self.session_id)
            raise

    async def step(self, hidden: torch.Tensor, start_position: int, token_ids: Sequence[int] = ()) -> torch.Tensor:
        rewind = start_position < self._stepped
        for engine in self.engines:
            hidden = await asyncio.to_thread(engine.step, self.session_id, hidden, start_position, rewind=rewind)
        self._stepped = start_position + hidden.shape[1]
        return hidden

    async def close(self) -> None:
        for engine in self.engines:
            engine.close_session(self.session_id)


class LocalBackend:
    """Spans are loaded once; each request opens its own session on every engine."""

    def __init__(
        self,
        model_dir: str | Path,
        spans: Sequence[tuple[int, int]] | None = None,
        device: str = "cpu",
        *,
        model_name: str | None = None,
        max_context: int | None = None,
        cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
    ) -> None:
        manifest = Manifest.load(model_dir)
        spans = list(spans) if spans is not None else [(0, manifest.num_blocks)]
        check_spans_tile(spans, manifest.num_blocks)
        self.client = ClientPart.load(model_dir, device=device)
        self.engines = [
            SpanEngine.load(model_dir, start, end, device=device, cache_budget_bytes=cache_budget_bytes)
            for start, end in spans
        ]
        self.model_name = model_name or manifest.name
        self.max_context = max_context or _context_length(manifest)

    async def open_chain(self, max_length: int, charge: Charge = UNMETERED) -> Chain:
        return LocalChain(self.engines, max_length=max_length)


def _context_length(manifest: Manifest) -> int:
    """The model's trained context length; 2048 when the config does not say."""
    config = manifest.config.get("text_config", manifest.config)
    value = config.get("max_position_embeddings") or manifest.config.get("max_position_embeddings")
    return int(value) if value else 2048
