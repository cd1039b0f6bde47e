"""Several models behind one API: requests routed by "model", /v1/models with coverage, a clear 503
for a model whose blocks are not all served. Two in-process backends of the tiny chat model, under
different names and context limits, stand for two models."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from coop.coordinator.accounts.observations import Metering
from coop.coordinator.catalog import Coverage, ModelCatalog, ServedModel
from coop.coordinator.http.app import create_app
from coop.errors import ModelStoreError, RequestError, RouteUnavailable
from coop.ledger.models import Observation
from coop.pipeline.charge import Payer
from coop.pipeline.local import LocalBackend
from coop.receipts import TokenTally
from coop.swarm.routing import Hop
from tests.http_servers import serve_in_thread

FIRST, SECOND = "tiny-first", "tiny-second"
FIRST_CONTEXT, SECOND_CONTEXT = 64, 128
GAP = [(2, 4)]  # the second model's blocks no serving node holds, while the gap is open


class Gap:
    """A swarm whose blocks 2:4 are held by no serving node until `close`d."""

    def __init__(self) -> None:
        self.missing = list(GAP)
        self.refreshes = 0

    def __call__(self) -> list[tuple[int, int]]:
        return self.missing

    async def refresh(self) -> None:
        self.refreshes += 1


@pytest.fixture(scope="module")
def backends(tiny_chat_model_dir: str) -> tuple[LocalBackend, LocalBackend]:
    first = LocalBackend(tiny_chat_model_dir, model_name=FIRST, max_context=FIRST_CONTEXT)
    second = LocalBackend(tiny_chat_model_dir, model_name=SECOND, max_context=SECOND_CONTEXT)
    return first, second


@pytest.fixture(scope="module")
def gap() -> Gap:
    return Gap()


@pytest.fixture(scope="module")
def url(backends: tuple[LocalBackend, LocalBackend], gap: Gap) -> Iterator[str]:
    first, second = backends
    catalog = ModelCatalog([ServedModel(first), ServedModel(second, gap, gap.refresh)])
    with serve_in_thread(create_app(catalog)) as base_url:
        yield base_url


def _chat(url: str, model: str | None, max_tokens: int = 3) -> httpx.Response:
    body: dict[str, object] = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens}
    if model is not None:
        body["model"] = model
    return httpx.post(f"{url}/v1/chat/completions", json=body | {"temperature": 0}, timeout=60)


def test_models_lists_every_model_with_its_coverage(url: str, gap: Gap) -> None:
    cards = {card["id"]: card for card in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
    assert list(cards) == [FIRST, SECOND]
    assert cards[FIRST]["coop"] == {
        "covered": True,
        "coverage": 1.0,
        "num_blocks": 4,
        "missing_blocks": [],
        "default": True,
    }
    assert cards[SECOND]["coop"] == {
        "covered": False,
        "coverage": 0.5,
        "num_blocks": 4,
        "missing_blocks": [[2, 4]],
        "default": False,
    }
    assert (cards[FIRST]["max_model_len"], cards[SECOND]["max_model_len"]) == (FIRST_CONTEXT, SECOND_CONTEXT)


def test_requests_run_on_the_model_they_name(url: str, gap: Gap) -> None:
    unnamed = _chat(url, None)
    assert unnamed.status_code == 200, unnamed.text
    assert unnamed.json()["model"] == FIRST  # no "model": the default, the first given
    named = _chat(url, FIRST)
    assert named.status_code == 200 and named.json()["model"] == FIRST
    # each model's own limits apply: a 31-token prompt and 50 more fit the second model's context, not the first's
    too_long = _chat(url, FIRST, max_tokens=50)
    assert too_long.status_code == 400 and f"maximum context length is {FIRST_CONTEXT}" in too_long.text
    gap.missing = []
    try:
        second = _chat(url, SECOND, max_tokens=50)
        assert second.status_code == 200, second.text
        assert second.json()["model"] == SECOND
    finally:
        gap.missing = list(GAP)


def test_uncovered_model_is_a_clear_503_and_the_other_still_answers(url: str, gap: Gap) -> None:
    refreshes = gap.refreshes
    refused = _chat(url, SECOND)
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "route_unavailable"
    assert f"model '{SECOND}' is 50% covered" in error["message"] and "2:4" in error["message"]
    assert gap.refreshes == refreshes + 1  # the view was re-read before refusing
    assert _chat(url, FIRST).status_code == 200


def test_unknown_model_names_the_served_ones(url: str) -> None:
    response = _chat(url, "gpt-4")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert repr(FIRST) in error["message"] and repr(SECOND) in error["message"]


# -- the catalog alone ----------------------------------------------------------------------------


def test_catalog_refuses_no_model_and_two_of_one_name(backends: tuple[LocalBackend, LocalBackend]) -> None:
    with pytest.raises(ModelStoreError, match="at least one"):
        ModelCatalog([])
    with pytest.raises(ModelStoreError, match="share a name"):
        ModelCatalog([ServedModel(backends[0]), ServedModel(backends[0])])


def test_catalog_finds_models_by_name_and_hash(backends: tuple[LocalBackend, LocalBackend]) -> None:
    catalog = ModelCatalog([ServedModel(b) for b in backends])
    assert catalog.get(None) is catalog.default and catalog.get(SECOND).backend is backends[1]
    with pytest.raises(RequestError) as info:
        catalog.get("other")
    assert info.value.status == 404 and info.value.code == "model_not_found"
    assert catalog.by_hash(backends[0].client.manifest.content_hash) is catalog.default  # same model: the first
    assert catalog.by_hash("0" * 64) is None


def test_coverage_and_require_covered(backends: tuple[LocalBackend, LocalBackend]) -> None:
    assert Coverage(30, [(10, 20), (25, 30)]).fraction == pytest.approx(0.5)
    assert Coverage(30, []).covered and not Coverage(30, [(0, 1)]).covered
    gap = Gap()
    model = ServedModel(backends[1], gap, gap.refresh)
    with pytest.raises(RouteUnavailable) as info:
        asyncio.run(model.require_covered())
    assert info.value.missing_blocks == GAP and info.value.num_blocks == 4
    gap.missing = []
    asyncio.run(model.require_covered())  # covered: no error, no refresh needed
    assert gap.refreshes == 1


class RecordedFlops:
    """Fair share's input, as `Metering` feeds it."""

    def __init__(self) -> None:
        self.flops: list[float] = []

    def record(self, provider: str | None, consumer: str, flops: float, at_s: float) -> None:
        self.flops.append(flops)


def test_each_model_s_sessions_are_observed_and_counted_at_its_own_flops() -> None:
    shares = RecordedFlops()
    other = {"cd34": lambda start, end: 100 * (end - start)}
    metering = Metering(shares, lambda start, end: 10 * (end - start), model_rates=other)  # type: ignore[arg-type]
    hops = [Hop("n1", "127.0.0.1:1", 0, 2, "alpha")]
    metering.stepped("s1", Payer("beta", "key-1"), hops, 3, TokenTally(prefill=3))  # the default model's
    metering.stepped("s2", Payer("beta", "key-1", "cd34"), hops, 3, TokenTally(prefill=3))
    assert shares.flops == [60, 600]
    written: list[Observation] = []
    metering.flush(written.extend)
    assert {row.session_id: row.model_hash for row in written} == {"s1": "", "s2": "cd34"}
