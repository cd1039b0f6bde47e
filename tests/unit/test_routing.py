"""Route and span choice as pure functions over announcements: no network."""

from __future__ import annotations

import time

import pytest

from coop.errors import RouteUnavailable
from coop.swarm.announcement import NodeAnnouncement
from coop.swarm.routing import choose_route, choose_span, coverage_of, missing_blocks

NUM_BLOCKS = 30


def node(node_id: str, start: int, end: int, tps: float = 10.0) -> NodeAnnouncement:
    now = time.time()
    return NodeAnnouncement(
        node_id=node_id,
        pool_id="p",
        model_hash="m",
        start=start,
        end=end,
        endpoint=f"127.0.0.1:{5000 + start}",
        institution="i",
        throughput_tps=tps,
        free_cache_bytes=1,
        announced_at=now,
        expires_at=now + 10,
    )


def spans(route: list) -> list[tuple[str, int, int]]:  # type: ignore[type-arg]
    return [(h.node_id, h.start, h.end) for h in route]


def test_three_disjoint_spans_make_the_only_route() -> None:
    nodes = [node("c", 20, 30), node("a", 0, 10), node("b", 10, 20)]
    assert spans(choose_route(nodes, NUM_BLOCKS)) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_prefers_fewer_hops_and_faster_nodes() -> None:
    nodes = [node("a", 0, 10), node("b", 10, 20), node("c", 20, 30), node("whole", 0, 30, tps=10.0)]
    assert spans(choose_route(nodes, NUM_BLOCKS)) == [("whole", 0, 30)]
    slow_whole = [*nodes[:3], node("whole", 0, 30, tps=1.0)]
    assert spans(choose_route(slow_whole, NUM_BLOCKS)) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_overlapping_spans_are_cut_into_sub_spans() -> None:
    nodes = [node("a", 0, 12), node("b", 10, 30)]
    route = choose_route(nodes, NUM_BLOCKS)
    assert [h.node_id for h in route] == ["a", "b"]
    assert route[0].start == 0 and route[-1].end == 30 and route[0].end == route[1].start


def test_load_spreads_sessions_over_replicas() -> None:
    nodes = [node("a", 0, 10), node("b1", 10, 20), node("b2", 10, 20), node("c", 20, 30)]
    first = choose_route(nodes, NUM_BLOCKS)[1].node_id
    second = choose_route(nodes, NUM_BLOCKS, load={first: 1})[1].node_id
    assert {first, second} == {"b1", "b2"}


def test_excluded_nodes_and_missing_blocks() -> None:
    nodes = [node("a", 0, 10), node("b", 10, 20), node("c", 20, 30)]
    with pytest.raises(RouteUnavailable, match="10:20") as caught:
        choose_route(nodes, NUM_BLOCKS, exclude={"b"})
    assert caught.value.missing_blocks == [(10, 20)]
    assert missing_blocks([node("a", 0, 5), node("c", 25, 30)], NUM_BLOCKS) == [(5, 25)]
    assert missing_blocks([], 3) == [(0, 3)]


def test_choose_span_fills_holes_first() -> None:
    coverage = coverage_of([node("a", 0, 10), node("c", 20, 30)], NUM_BLOCKS)
    assert choose_span(coverage, 10) == (10, 20)
    assert choose_span([0] * NUM_BLOCKS, 10) == (0, 10)
    assert choose_span(coverage_of([node("a", 0, 30)], NUM_BLOCKS), 50) == (0, 30)
    assert choose_span([2, 2, 1, 1, 2, 2], 2) == (2, 4)


class _FixedDirectory:
    """Stands in for the DHT: the view's logic is what is tested here."""

    def __init__(self, nodes: list[NodeAnnouncement]) -> None:
        self.nodes = nodes

    def list_nodes(self, pool_id: str, model_hash: str, validator: object = None) -> list[NodeAnnouncement]:
        return list(self.nodes)


def test_measured_rtt_steers_routes_to_the_nearer_replica() -> None:
    import asyncio

    from coop.swarm.view import SwarmView

    nodes = [node("a", 0, 10), node("far", 10, 20), node("near", 10, 20), node("c", 20, 30)]
    rtts = {"a": 0.001, "far": 0.2, "near": 0.001, "c": 0.001}

    async def ping(announcement: NodeAnnouncement) -> float:
        if announcement.node_id == "c":
            raise TimeoutError  # an unanswered ping keeps the default estimate
        return rtts[announcement.node_id]

    async def run() -> list[str]:
        view = SwarmView(_FixedDirectory(nodes), pool_id="p", model_hash="m", num_blocks=NUM_BLOCKS, ping=ping)  # type: ignore[arg-type]
        await view.start()
        await view.stop()
        assert set(view.rtt_s) == {"a", "far", "near"}
        return [hop.node_id for hop in await view.route()]

    rtts["far"], rtts["near"] = 0.001, 0.2  # measured, not named: the lower RTT wins either way
    assert asyncio.run(run())[1] == "far"
    rtts["far"], rtts["near"] = 0.2, 0.001
    assert asyncio.run(run())[1] == "near"
