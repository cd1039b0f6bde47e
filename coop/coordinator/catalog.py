"""The models one coordinator serves, found by the name clients put in a request's "model".

The first model is the default: a request that names none gets it, as when a coordinator served a
single model. Each model has its own backend (client part, swarm view, spot checks). Whether its
blocks are covered is asked of the model itself: an in-process backend always is, a pool's model is
as long as serving nodes hold every block.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from coop.errors import ModelStoreError, RequestError, RouteUnavailable
from coop.pipeline.backend import Backend

Blocks = list[tuple[int, int]]  # runs [start, end) of blocks


def _nothing_missing() -> Blocks:
    return []


@dataclass(frozen=True)
class Coverage:
    num_blocks: int
    missing_blocks: Blocks  # runs no serving node holds now

    @property
    def covered(self) -> bool:
        return not self.missing_blocks

    @property
    def fraction(self) -> float:
        """Share of the model's blocks that some serving node holds."""
        return 1 - sum(end - start for start, end in self.missing_blocks) / max(self.num_blocks, 1)


@dataclass(frozen=True)
class ServedModel:
    backend: Backend
    # runs of blocks no serving node holds, from the live view as it is (e.g. `SwarmView.missing_blocks`)
    missing_blocks: Callable[[], Blocks] = _nothing_missing
    # re-reads the live view, so that a node that just joined is seen before a request is refused
    refresh: Callable[[], Awaitable[None]] | None = None

    @property
    def name(self) -> str:
        return self.backend.model_name

    @property
    def model_hash(self) -> str:
        return self.backend.client.manifest.content_hash

    def coverage(self) -> Coverage:
        return Coverage(self.backend.client.manifest.num_blocks, self.missing_blocks())

    async def require_covered(self) -> None:
        """RouteUnavailable (503) naming the model and its missing blocks, unless serving nodes hold them all."""
        if self.missing_blocks() and self.refresh is not None:
            await self.refresh()
        coverage = self.coverage()
        if not coverage.covered:
            raise RouteUnavailable(coverage.missing_blocks, coverage.num_blocks, model=self.name)


class ModelCatalog:
    def __init__(self, models: Sequence[ServedModel]) -> None:
        if not models:
            raise ModelStoreError("a coordinator needs at least one prepared model")
        self.models = list(models)
        self._by_name = {m.name: m for m in self.models}
        if len(self._by_name) != len(self.models):
            names = [m.name for m in self.models]
            raise ModelStoreError(f"two models share a name ({names}): requests could not tell them apart")

    @classmethod
    def single(cls, backend: Backend) -> ModelCatalog:
        return cls([ServedModel(backend)])

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models)

    def get(self, name: str | None) -> ServedModel:
        """The model a request names (None: the default); model_not_found (404) naming the served ones."""
        if name is None:
            return self.default
        found = self._by_name.get(name)
        if found is None:
            served = ", ".join(repr(m.name) for m in self.models)
            raise RequestError(
                f"model {name!r} is not served here; this server serves {served} (see GET /v1/models)",
                status=404,
                code="model_not_found",
                param="model",
            )
        return found

    def by_hash(self, model_hash: str) -> ServedModel | None:
        return next((m for m in self.models if m.model_hash == model_hash), None)
