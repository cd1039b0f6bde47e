"""Metrics without a pool: a node's /metrics served over real HTTP from a NodeInfo and an outbox, the
coordinator's generation timing and its /metrics token. (A live pool's metrics: tests/e2e/test_ledger.py.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from coop.coordinator.http.metrics import CoordinatorMetrics
from coop.coordinator.http.protocol import RouteHop
from coop.coordinator.http.text_stream import Finished, GenerationEvent, Started, TextDelta
from coop.errors import PeerError, Unauthorized
from coop.node.metrics import NodeMetrics
from coop.node.outbox import Outbox
from coop.pipeline.sampling import SamplingParams
from coop.receipts import SignedReceipt
from coop.wire.generated import coop_pb2 as pb

LIMIT_HITS = 3
STEPS_RUN = 7
RESERVED_BYTES = 4096
PENDING_RECEIPTS = 2
WEIGHT_LAYOUT = "stock (measured: packed/stock 1.29x at 1 row, 0.95x at 16 rows)"
PROMPT_TOKENS = 5
GENERATED = [11, 12, 13, 14]
HOPS = [
    RouteHop(node_id="n1", institution="Alpha", endpoint="127.0.0.1:1", start=0, end=2, failovers=1),
    RouteHop(node_id="n2", institution="Beta", endpoint="127.0.0.1:2", start=2, end=4, failovers=1),
]


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    families = text_string_to_metric_families(text)
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def _refuse(context: object) -> None:
    raise Unauthorized("no certificate of this pool")


def test_a_node_serves_its_info_outbox_and_refusals(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    for i in range(PENDING_RECEIPTS):
        outbox.add(f"r{i}", "Coord", SignedReceipt(b"body", b"signature", b"cert"))
    info = pb.NodeInfo(
        node_id="n1",
        start=0,
        end=2,
        reserved_cache_bytes=RESERVED_BYTES,
        weight_layout=WEIGHT_LAYOUT,
        counters=pb.NodeInfo.Counters(steps_run=STEPS_RUN, limited={"max_sessions_per_peer": LIMIT_HITS}),
    )
    metrics = NodeMetrics()
    authorize = metrics.counting_refusals(_refuse)
    with pytest.raises(Unauthorized):
        authorize(None)  # type: ignore[arg-type]
    metrics.step_seconds.observe(0.01)

    async def scrape() -> str:
        port = metrics.serve(lambda: info, outbox, "127.0.0.1", 0)
        try:
            response = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics", timeout=30)
            return response.text
        finally:
            metrics.stop()

    samples = _samples(asyncio.run(scrape()))
    outbox.close()
    assert samples[("coop_node_steps_total", frozenset())] == STEPS_RUN
    assert samples[("coop_node_kv_cache_reserved_bytes", frozenset())] == RESERVED_BYTES
    assert samples[("coop_node_receipts_pending", frozenset())] == PENDING_RECEIPTS
    assert samples[("coop_node_step_seconds_count", frozenset())] == 1
    rejected = {
        dict(labels)["reason"]: v for (name, labels), v in samples.items() if name == "coop_node_rejected_calls_total"
    }
    assert rejected == {"max_sessions_per_peer": LIMIT_HITS, "unauthorized": 1}
    assert samples[("coop_node_info", frozenset({("node_id", "n1"), ("model_hash", ""), ("blocks", "0:2")}))] == 1
    how = "measured: packed/stock 1.29x at 1 row, 0.95x at 16 rows"
    assert samples[("coop_node_weight_layout_info", frozenset({("layout", "stock"), ("choice", how)}))] == 1


async def _generation(fail: bool = False) -> AsyncGenerator[GenerationEvent, None]:
    yield Started()
    yield TextDelta("Hello")
    if fail:
        raise PeerError("the node went away")
    yield Finished("length", GENERATED, PROMPT_TOKENS, HOPS, SamplingParams(max_tokens=len(GENERATED)))


def _value(metrics: CoordinatorMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_generations_are_timed_and_counted_by_outcome() -> None:
    metrics = CoordinatorMetrics()

    async def run() -> None:
        assert [type(e) async for e in metrics.timed(_generation())] == [Started, TextDelta, Finished]
        with pytest.raises(PeerError):
            async for _ in metrics.timed(_generation(fail=True)):
                pass
        async with contextlib.aclosing(metrics.timed(_generation())) as events:
            await anext(events)  # the client goes away after the first event

    asyncio.run(run())
    assert _value(metrics, "coop_coordinator_generations_total", outcome="length") == 1
    assert _value(metrics, "coop_coordinator_generations_total", outcome="error") == 1
    assert _value(metrics, "coop_coordinator_generations_total", outcome="cancelled") == 1
    assert _value(metrics, "coop_coordinator_time_to_first_token_seconds_count") == 2  # the cancelled one sent none
    assert _value(metrics, "coop_coordinator_time_per_output_token_seconds_count") == 1
    assert _value(metrics, "coop_coordinator_completion_tokens_total") == len(GENERATED)
    assert _value(metrics, "coop_coordinator_prompt_tokens_total") == PROMPT_TOKENS
    assert _value(metrics, "coop_coordinator_failovers_total") == 1
    assert _value(metrics, "coop_coordinator_route_hops_total", node_id="n2", institution="Beta") == 1


def test_metrics_token_is_asked_for_when_set() -> None:
    metrics = CoordinatorMetrics()
    token = SecretStr("s3cret")
    for wrong in (None, "Bearer nope", "s3cret"):
        with pytest.raises(Unauthorized):
            metrics.exposition(wrong, token)
    assert b"coop_coordinator_http_requests" in metrics.exposition("Bearer s3cret", token)
    assert b"coop_coordinator_http_requests" in metrics.exposition(None, None)
