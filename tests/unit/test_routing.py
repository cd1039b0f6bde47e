"""Route and span choice as pure functions over announcements, measurements and load: no network."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from coop.errors import RouteUnavailable
from coop.swarm.announcement import NodeAnnouncement
from coop.swarm.measurements import Measured, Measurements, attribute_step
from coop.swarm.node_key import NodeKey, key_of
from coop.swarm.refusals import HALF_LIFE_S, RefusalRates
from coop.swarm.routing import MAX_REFUSAL_PENALTY, Hop, choose_route, expected_block_s, missing_blocks, refusal_penalty
from coop.swarm.view import Ping, SwarmView
from tests.announcements import node

NUM_BLOCKS = 30
LIAR_TPS = 1e12
BLOCK_S = 0.001  # what the honest nodes were measured at, per block and decode token


def keyed(node_id: str, institution: str = "i") -> NodeKey:
    """The key of `tests.announcements.node(node_id, ...)`, whose institution is "i" unless named."""
    return NodeKey(institution, node_id)


def spans(route: list[Hop]) -> list[tuple[str, int, int]]:
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
    second = choose_route(nodes, NUM_BLOCKS, load={keyed(first): 1})[1].node_id
    assert {first, second} == {"b1", "b2"}


def test_excluded_nodes_and_missing_blocks() -> None:
    nodes = [node("a", 0, 10), node("b", 10, 20), node("c", 20, 30)]
    with pytest.raises(RouteUnavailable, match="10:20") as caught:
        choose_route(nodes, NUM_BLOCKS, exclude={("i", "b")})
    assert caught.value.missing_blocks == [(10, 20)]
    assert missing_blocks([node("a", 0, 5), node("c", 25, 30)], NUM_BLOCKS) == [(5, 25)]
    assert missing_blocks([], 3) == [(0, 3)]


class _FixedDirectory:
    """Stands in for the DHT: the view's logic is what is tested here."""

    def __init__(self, nodes: list[NodeAnnouncement]) -> None:
        self.nodes = nodes

    def list_nodes(self, pool_id: str, model_hash: str, validator: object = None) -> list[NodeAnnouncement]:
        return list(self.nodes)


def _view(nodes: list[NodeAnnouncement], ping: Ping | None = None) -> SwarmView:
    directory = _FixedDirectory(nodes)
    return SwarmView(directory, pool_id="p", model_hash="m", num_blocks=NUM_BLOCKS, validator=None, ping=ping)  # type: ignore[arg-type]


def test_measured_rtt_steers_routes_to_the_nearer_replica() -> None:
    nodes = [node("a", 0, 10), node("far", 10, 20), node("near", 10, 20), node("c", 20, 30)]
    rtts = {"a": 0.001, "far": 0.2, "near": 0.001, "c": 0.001}

    async def ping(announcement: NodeAnnouncement) -> float:
        if announcement.node_id == "c":
            raise TimeoutError  # an unanswered ping keeps the default estimate
        return rtts[announcement.node_id]

    async def run() -> list[str]:
        view = _view(nodes, ping)
        await view.start()
        await view.stop()
        assert {n for n, m in view.measurements.nodes.items() if m.rtt_s is not None} == {
            keyed("a"),
            keyed("far"),
            keyed("near"),
        }
        return [hop.node_id for hop in await view.route()]

    rtts["far"], rtts["near"] = 0.001, 0.2  # measured, not named: the lower RTT wins either way
    assert asyncio.run(run())[1] == "far"
    rtts["far"], rtts["near"] = 0.2, 0.001
    assert asyncio.run(run())[1] == "near"


# -- throughput is measured, not believed ------------------------------------------------------


def honest_pool() -> list[NodeAnnouncement]:
    """Two nodes that together cover the model, one that serves it whole, and a liar claiming 1e12 tokens/s."""
    return [node("head", 0, 15), node("tail", 15, 30), node("whole", 0, 30), node("liar", 0, 30, tps=LIAR_TPS)]


HONEST_MEASURED = {keyed(name): Measured(rtt_s=0.001, block_s=BLOCK_S) for name in ("head", "tail", "whole")}


def test_a_claim_is_believed_no_faster_than_the_fastest_measured_node() -> None:
    estimates = expected_block_s(honest_pool(), {**HONEST_MEASURED, keyed("whole"): Measured(block_s=BLOCK_S / 2)})
    assert estimates[keyed("liar")] == BLOCK_S / 2
    assert estimates[keyed("head")] == estimates[keyed("tail")] == BLOCK_S
    slow_claim = node("slow", 0, 30, tps=1.0)  # a claim slower than the cap stands
    assert expected_block_s([slow_claim], HONEST_MEASURED)[keyed("slow")] == 1.0 / NUM_BLOCKS


def test_before_any_measurement_the_median_claim_caps_the_liar() -> None:
    nodes = honest_pool()
    estimates = expected_block_s(nodes, {})
    # the median claim, per block
    assert estimates[keyed("liar")] == estimates[keyed("whole")] == estimates[keyed("head")]
    # without load the liar and the honest whole node cost the same: the liar is not preferred
    assert spans(choose_route(nodes, NUM_BLOCKS, load={keyed("liar"): 1})) == [("whole", 0, 30)]


def test_a_measured_liar_is_priced_by_what_it_did() -> None:
    measurements = Measurements()
    measurements.nodes.update(HONEST_MEASURED)
    nodes = honest_pool()
    liar_route, liar_sessions = {keyed("liar"): NUM_BLOCKS}, {keyed("liar"): 1}
    for _ in range(3):  # the liar really takes 10 ms per block
        estimates = expected_block_s(nodes, measurements.nodes)
        measurements.step_measured(10 * BLOCK_S * NUM_BLOCKS, liar_route, block_s=estimates, sessions=liar_sessions)
    liar = measurements.nodes[keyed("liar")].block_s
    assert liar is not None and liar > 5 * BLOCK_S
    load = {keyed("whole"): 3, keyed("head"): 3, keyed("tail"): 3}  # even busy honest nodes beat the slow liar
    assert "liar" not in {
        hop.node_id for hop in choose_route(nodes, NUM_BLOCKS, measured=measurements.nodes, load=load)
    }


def test_fifty_sessions_spread_over_every_node_that_can_serve_them() -> None:
    nodes = honest_pool()
    load: Counter[NodeKey] = Counter()
    routes: Counter[str] = Counter()
    for _ in range(50):
        route = choose_route(nodes, NUM_BLOCKS, measured=HONEST_MEASURED, load=load)
        load.update(hop.key for hop in route)
        routes["+".join(hop.node_id for hop in route)] += 1
    assert set(routes) == {"liar", "whole", "head+tail"}
    assert max(routes.values()) - min(routes.values()) <= 2
    assert load[keyed("head")] == load[keyed("tail")] == routes["head+tail"]


def test_a_step_time_is_shared_by_expected_cost_and_a_slow_hop_keeps_its_own() -> None:
    a, b, one = keyed("a"), keyed("b"), keyed("one")
    assert attribute_step(0.3, {a: 0.1, b: 0.2}, measured=()) == pytest.approx({a: 0.1, b: 0.2})
    assert attribute_step(0.5, {one: 0.1}, measured=()) == {one: 0.5}  # a lone hop is measured exactly
    # "b" was expected to be as quick as measured "a", but the route took a second: "b" gets at
    # least what "a"'s measurement leaves, "a" no more than its proportional share
    spent = attribute_step(1.0, {a: 0.01, b: 0.01}, measured={a})
    assert spent[b] == pytest.approx(0.99) and spent[a] == pytest.approx(0.5)


def test_the_view_reserves_routes_as_it_chooses_them_and_measures_decode_steps() -> None:
    nodes = [node("a", 0, 30), node("b", 0, 30)]

    async def run() -> None:
        view = _view(nodes)
        await view.start()
        await view.stop()
        routes = [await view.route() for _ in range(3)]  # no stream opened in between
        assert {routes[0][0].node_id, routes[1][0].node_id} == {"a", "b"}  # the third is a tie: chance
        busy = max(routes, key=lambda route: view.load[route[0].key])
        view.step_completed(busy, tokens=7, seconds=5.0)  # a prompt: not a decode step
        assert busy[0].key not in view.measurements.nodes
        view.step_completed(busy, tokens=1, seconds=0.3)  # 0.3 s = 30 blocks x 2 of our sessions x 5 ms
        assert view.measurements.nodes[busy[0].key].block_s == pytest.approx(0.005)
        for route in routes:
            view.release(route)
        assert not view.load

    asyncio.run(run())


# -- ties, refusals and suspicion: node ids are cheap to mint ----------------------------------

SYBILS = [node(f"0000-fake-{i}", 0, 30, institution="mallory") for i in range(8)]  # ids minted to sort first
HONEST = node("zzzz-honest", 0, 30, institution="uni")


def test_ties_go_to_the_less_loaded_node_then_to_chance_never_to_node_id_order() -> None:
    nodes = [*SYBILS, HONEST]
    winners = Counter(choose_route(nodes, NUM_BLOCKS, rng=random.Random(seed))[0].node_id for seed in range(90))
    assert winners["zzzz-honest"] > 0 and len(winners) == len(nodes)  # every tied node wins some
    busy = {key_of(n): 1 for n in SYBILS}
    assert spans(choose_route(nodes, NUM_BLOCKS, load=busy)) == [("zzzz-honest", 0, 30)]


def test_a_node_that_refuses_more_than_it_serves_loses_its_routes() -> None:
    assert refusal_penalty(0.0) == 1.0 and refusal_penalty(0.5) == pytest.approx(2.0)
    assert refusal_penalty(1.0) == MAX_REFUSAL_PENALTY
    refusing = {("mallory", n.node_id): 0.6 for n in SYBILS}
    for seed in range(20):
        route = choose_route([*SYBILS, HONEST], NUM_BLOCKS, refusal_rates=refusing, rng=random.Random(seed))
        assert spans(route) == [("zzzz-honest", 0, 30)]
    # the honest node, busy with two of our sessions, still beats a node that refuses nearly all
    refusing = {("mallory", n.node_id): 0.9 for n in SYBILS}
    assert choose_route([*SYBILS, HONEST], NUM_BLOCKS, load={key_of(HONEST): 2}, refusal_rates=refusing)[0] == Hop(
        "zzzz-honest", HONEST.endpoint, 0, 30, "uni"
    )


def test_refusal_rates_average_outcomes_and_fade() -> None:
    now = [0.0]
    rates = RefusalRates(clock=lambda: now[0])
    key = ("mallory", "0000-fake-0")
    rates.refused(key)
    assert rates.rates() == {key: 1.0}  # a fresh id is priced as a refuser after its first refusal
    rates.served(key)
    assert rates.rates()[key] == pytest.approx(0.7)
    now[0] += HALF_LIFE_S
    assert rates.rates()[key] == pytest.approx(0.35)
    rates.keep_only(set())
    assert rates.rates() == {}


def test_suspects_and_refusals_are_kept_per_institution_and_node_id() -> None:
    twin = node("zzzz-honest", 0, 30, institution="mallory")  # the same node id, minted by another member

    async def run() -> None:
        view = _view([HONEST, twin])
        await view.start()
        await view.stop()
        view.suspect(("mallory", "zzzz-honest"))
        assert view.suspects() == {("mallory", "zzzz-honest")}
        assert [(n.institution, n.node_id) for n in view.live_nodes()] == [("uni", "zzzz-honest")]
        view.refused(("uni", "zzzz-honest"))
        view.served([Hop("zzzz-honest", twin.endpoint, 0, 30, "mallory")])
        assert view.refusals.rates() == {("uni", "zzzz-honest"): pytest.approx(1.0), ("mallory", "zzzz-honest"): 0.0}
        assert [h.key for h in await view.route()] == [("uni", "zzzz-honest")]  # its suspected twin is not
        with pytest.raises(RouteUnavailable):
            await view.route(avoid_institutions={"uni"})

    asyncio.run(run())


def test_measurements_and_load_are_kept_per_institution_and_node_id() -> None:
    """A member naming its node like another member's node neither shares nor poisons its figures."""
    a_x, b_x = node("x", 0, 30, institution="A"), node("x", 0, 30, institution="B")
    rival = node("rival", 0, 30, institution="C")  # 1.5 times slower than B's "x": it wins if "x" is slowed

    async def run() -> None:
        view = _view([a_x, b_x, rival])
        await view.start()
        await view.stop()
        for announced, block_s in ((b_x, BLOCK_S), (rival, 1.5 * BLOCK_S), (a_x, 100 * BLOCK_S)):
            hop = Hop(announced.node_id, announced.endpoint, 0, NUM_BLOCKS, announced.institution)
            view.step_completed([hop], tokens=1, seconds=block_s * NUM_BLOCKS)
        assert view.measurements.nodes[key_of(b_x)].block_s == pytest.approx(BLOCK_S)
        assert view.measurements.nodes[key_of(a_x)].block_s == pytest.approx(100 * BLOCK_S)
        held = await view.route(exclude={key_of(b_x), key_of(rival)})  # one session of ours on A's "x"
        assert view.load == {key_of(a_x): 1}
        for _ in range(10):  # neither A's slowness nor A's load reaches B's "x"
            hops = await view.route()
            assert [hop.key for hop in hops] == [key_of(b_x)]
            view.release(hops)
        view.release(held)
        assert not view.load

    asyncio.run(run())


def test_a_session_counts_once_among_the_open_sessions_however_many_hops_its_route_has() -> None:
    async def run() -> None:
        view = _view([node("a", 0, 10), node("b", 10, 20), node("c", 20, 30)])
        await view.start()
        await view.stop()
        first, second = await view.route(), await view.route()
        assert view.sessions_open == 2 and sum(view.load.values()) == 6
        view.release(first)
        view.release([])  # a chain that held no route releases nothing
        assert view.sessions_open == 1 and sum(view.load.values()) == 3
        view.release(second)
        assert view.sessions_open == 0 and not view.load

    asyncio.run(run())
