"""What the HTTP API needs from "the model": a tokenizer/head and a way to open a chain of blocks.

The API (`coop.coordinator.serving`) only talks to a `Backend`, so the same endpoints serve the
in-process reference path (`LocalBackend`) and the networked pool (a remote backend that finds
nodes and builds a route per request).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from coop.coordinator.generation import Chain, LocalChain, check_spans_tile
from coop.model.client_part import ClientPart
from coop.model.manifest import Manifest
from coop.node.engine import DEFAULT_CACHE_BUDGET_BYTES, SpanEngine


class Backend(Protocol):
    client: ClientPart  # tokenizer, chat template, embeddings/head
    model_name: str  # the name clients put in "model"
    max_context: int  # max prompt + completion tokens

    async def open_chain(self, max_length: int, *, consumer: str = "") -> Chain:
        """A fresh route/session for one request of at most max_length tokens, charged to `consumer`.

        May raise `coop.errors.RouteUnavailable` when no set of nodes covers every block.
        """
        ...

    def route_info(self, chain: Chain) -> list[dict[str, object]]:
        """For diagnostics: one dict per hop of the chain (may be empty)."""
        ...


class LocalBackend:
    """Every block in this process: the reference path, used by tests and `coop generate`.

    Spans are loaded once; each request opens its own session on every engine.
    """

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

    async def open_chain(self, max_length: int, *, consumer: str = "") -> Chain:
        return LocalChain(self.engines, max_length=max_length)

    def route_info(self, chain: Chain) -> list[dict[str, object]]:
        return [{"start": e.start, "end": e.end, "node": "local", "device": str(e.device)} for e in self.engines]


def _context_length(manifest: Manifest) -> int:
    """The model's trained context length; 2048 when the config does not say."""
    config = manifest.config.get("text_config", manifest.config)
    value = config.get("max_position_embeddings") or manifest.config.get("max_position_embeddings")
    return int(value) if value else 2048
