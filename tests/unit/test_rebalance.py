"""The rebalance rule (coop/swarm/rebalance.py): who moves where, and that a pool settles instead of oscillating;
and the node's move (coop/node/rebalancing.py): drained first, or not at all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import pytest

from coop.errors import InvalidInput
from coop.node.drain import ServingState
from coop.node.rebalancing import RebalancePolicy, Rebalancer
from coop.swarm.announcement import DRAINING, MAX_ANNOUNCED_SESSIONS, PAUSED, SERVING, NodeAnnouncement, NodeState
from coop.swarm.rebalance import Candidate, Placement, block_capacity, decide, demand_of

BLOCKS = 30
HALF = 15
TPS = 10.0
MODEL = "m"
OTHER_MODEL = "m2"


def node(
    node_id: str,
    start: int,
    end: int,
    tps: float = TPS,
    state: NodeState = SERVING,
    model: str = MODEL,
    sessions: int = 0,
) -> NodeAnnouncement:
    now = time.time()
    return NodeAnnouncement(
        node_id=node_id,
        pool_id="p",
        model_hash=model,
        start=start,
        end=end,
        endpoint="127.0.0.1:5000",
        institution="i",
        throughput_tps=tps,
        free_cache_bytes=1,
        state=state,
        active_sessions=sessions,
        announced_at=now,
        expires_at=now + 60,
    )


def half_node(length: int = HALF, model: str = MODEL, blocks: int = BLOCKS) -> Candidate:
    return Candidate(model_hash=model, num_blocks=blocks, length=length, throughput_tps=TPS)


def where(announcement: NodeAnnouncement) -> Placement:
    return Placement(announcement.model_hash, announcement.start, announcement.end)


def decide_for(me: NodeAnnouncement, nodes: Sequence[NodeAnnouncement], **kwargs: float) -> Placement | None:
    return decide(me.node_id, where(me), [half_node()], {MODEL: nodes}, **kwargs)


def test_a_node_moves_to_cover_a_gap() -> None:
    a, c = node("a", 0, HALF), node("c", 0, HALF)  # b, which served HALF:BLOCKS, left
    assert decide_for(c, [a, c]) == Placement(MODEL, HALF, BLOCKS)


def test_the_only_node_of_a_span_does_not_uncover_it_to_fill_a_gap_elsewhere() -> None:
    a = node("a", 0, HALF)
    assert decide_for(a, [a]) is None


def test_a_balanced_pool_does_not_move() -> None:
    nodes = [node("a", 0, HALF), node("b", HALF, BLOCKS), node("c", 0, HALF), node("d", HALF, BLOCKS)]
    assert all(decide_for(me, nodes) is None for me in nodes)


def test_one_extra_node_on_a_span_is_not_worth_a_move() -> None:
    # 2 vs 1: moving one makes it 1 vs 2, the bottleneck does not improve
    nodes = [node("a", 0, HALF), node("c", 0, HALF), node("b", HALF, BLOCKS)]
    assert all(decide_for(me, nodes) is None for me in nodes)


def test_an_over_covered_span_gives_a_node_to_a_thin_one() -> None:
    nodes = [node("a", 0, HALF), node("b", HALF, BLOCKS), node("c", HALF, BLOCKS), node("d", HALF, BLOCKS)]
    assert decide_for(nodes[3], nodes) == Placement(MODEL, 0, HALF)  # 1 vs 3 becomes 2 vs 2: twice the bottleneck


def test_a_gain_under_the_threshold_does_not_move() -> None:
    nodes = [node("a", 0, HALF), node("b", HALF, BLOCKS), node("c", HALF, BLOCKS), node("d", HALF, BLOCKS)]
    assert decide_for(nodes[3], nodes, threshold=2.5) is None


@pytest.mark.parametrize("state", [PAUSED, DRAINING])
def test_the_blocks_of_a_node_that_takes_no_session_count_as_uncovered(state: NodeState) -> None:
    a, b, c = node("a", 0, HALF), node("b", HALF, BLOCKS, state=state), node("c", 0, HALF)
    assert decide_for(c, [a, b, c]) == Placement(MODEL, HALF, BLOCKS)


def test_a_huge_claimed_throughput_cannot_pull_nodes_away() -> None:
    # the liar claims to carry the first half alone; capped at the median claim it is one node among others
    liar = node("liar", 0, HALF, tps=1e12)
    nodes = [liar, node("b", HALF, BLOCKS), node("c", HALF, BLOCKS), node("d", 0, HALF)]
    assert block_capacity(nodes, BLOCKS)[0] == pytest.approx(2 * TPS)
    assert all(decide_for(me, nodes) is None for me in nodes[1:])


def test_a_gap_pulls_one_node_per_round_and_the_pool_settles() -> None:
    """Nodes that apply the rule one after another (the node loop's jitter) converge and then stay put."""
    nodes = {name: node(name, 0, HALF) for name in ("a", "b", "c", "d")}
    for _round in range(6):
        for name in sorted(nodes):
            moved = decide_for(nodes[name], list(nodes.values()))
            if moved is not None:
                nodes[name] = node(name, moved.start, moved.end)
    spans = sorted((n.start, n.end) for n in nodes.values())
    assert spans == [(0, HALF), (0, HALF), (HALF, BLOCKS), (HALF, BLOCKS)]
    assert all(decide_for(me, list(nodes.values())) is None for me in nodes.values())


def test_nodes_of_different_lengths_settle_without_oscillating() -> None:
    nodes = {"a": node("a", 0, 10), "b": node("b", 0, 10), "c": node("c", 0, 10), "d": node("d", 10, 30, tps=TPS / 2)}
    lengths = {"a": 10, "b": 10, "c": 10, "d": 20}
    history = []
    for _round in range(8):
        for name in sorted(nodes):
            me = nodes[name]
            candidate = Candidate(MODEL, BLOCKS, lengths[name], me.throughput_tps)
            moved = decide(name, where(me), [candidate], {MODEL: list(nodes.values())})
            if moved is not None:
                nodes[name] = node(name, moved.start, moved.end, tps=me.throughput_tps)
        history.append(sorted((n.node_id, n.start) for n in nodes.values()))
    assert history[-1] == history[-2] == history[-3]  # settled
    assert min(block_capacity(list(nodes.values()), BLOCKS)) > 0  # and every block is covered


def test_a_starting_node_takes_the_gap_first_then_the_thinnest_window() -> None:
    nodes = [node("a", 0, HALF)]
    assert decide("new", None, [half_node()], {MODEL: nodes}) == Placement(MODEL, HALF, BLOCKS)
    nodes = [node("a", 0, HALF), node("b", HALF, BLOCKS), node("c", HALF, BLOCKS)]
    assert decide("new", None, [half_node()], {MODEL: nodes}) == Placement(MODEL, 0, HALF)


def test_a_model_with_a_gap_wins_over_a_covered_one() -> None:
    live = {MODEL: [node("a", 0, HALF), node("b", HALF, BLOCKS)], OTHER_MODEL: []}
    candidates = [half_node(), half_node(model=OTHER_MODEL, length=6, blocks=6)]
    assert decide("new", None, candidates, live) == Placement(OTHER_MODEL, 0, 6)
    live[MODEL].append(node("c", 0, HALF))
    assert decide("c", Placement(MODEL, 0, HALF), candidates, live) == Placement(OTHER_MODEL, 0, 6)


def test_among_covered_models_the_least_served_per_unit_of_demand_wins() -> None:
    live = {
        MODEL: [node("a", 0, BLOCKS)],
        OTHER_MODEL: [node("b", 0, BLOCKS), node("c", 0, BLOCKS)],
    }
    candidates = [half_node(length=BLOCKS), half_node(model=OTHER_MODEL, length=BLOCKS)]
    assert decide("new", None, candidates, live) == Placement(MODEL, 0, BLOCKS)
    # the other model carries 5 sessions on each block (so a demand of 6 against 1): it needs the node more
    live[OTHER_MODEL] = [node("b", 0, BLOCKS, sessions=3), node("c", 0, BLOCKS, sessions=2)]
    assert decide("new", None, candidates, live) == Placement(OTHER_MODEL, 0, BLOCKS)


def test_one_node_inflating_its_sessions_cannot_make_its_model_look_busy() -> None:
    """Demand is the median over blocks: a liar on a few blocks of the model is not the median."""
    liar = node("liar", 0, 2, sessions=MAX_ANNOUNCED_SESSIONS, model=OTHER_MODEL)
    assert demand_of([node("b", 0, BLOCKS, model=OTHER_MODEL), liar], BLOCKS) == 1.0
    live = {MODEL: [node("a", 0, BLOCKS)], OTHER_MODEL: [node("b", 0, BLOCKS), node("c", 0, BLOCKS), liar]}
    candidates = [half_node(length=BLOCKS), half_node(model=OTHER_MODEL, length=BLOCKS)]
    assert decide("new", None, candidates, live) == Placement(MODEL, 0, BLOCKS)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(InvalidInput, match="threshold"):
        decide("a", None, [half_node()], {}, threshold=0.5)
    with pytest.raises(InvalidInput, match="not one of the candidates"):
        decide("a", Placement(OTHER_MODEL, 0, 1), [half_node()], {})


def test_a_move_that_makes_the_span_it_leaves_the_new_bottleneck_is_not_made() -> None:
    # a fast node would double the bottleneck (1 -> 2 tokens/s), but its old span would then be the
    # weakest place of the model, weaker than where it went: the next move would be back there
    fast = node("fast", HALF, BLOCKS, tps=5.0)
    nodes = [node("a", 0, HALF, tps=1.0), node("b", HALF, BLOCKS, tps=1.0), node("c", HALF, BLOCKS, tps=1.0), fast]
    mine = Candidate(MODEL, BLOCKS, HALF, 5.0)
    assert decide("fast", where(fast), [mine], {MODEL: nodes}) is None
    assert decide("fast", where(fast), [mine], {MODEL: nodes[1:]}) == Placement(MODEL, 0, HALF)  # a gap: it moves


class _Service:
    """What the rebalancer reads and changes of the node service: its span, its sessions, its speed."""

    def __init__(self, sessions: int) -> None:
        self.engine = SimpleNamespace(manifest=SimpleNamespace(content_hash=MODEL), start=0, end=HALF)
        self.session_count = sessions
        self.throughput_tps = TPS

    def serve_span(self, engine: object) -> None:
        self.engine = engine


def _loaded(model: object, start: int, end: int) -> object:
    return SimpleNamespace(manifest=SimpleNamespace(content_hash=MODEL), start=start, end=end)


def _rebalancer(service: _Service, serving: ServingState, load: Callable[..., object] = _loaded) -> Rebalancer:
    announcer = SimpleNamespace(last=None)
    return Rebalancer(
        node_id="c",
        models={MODEL: SimpleNamespace(manifest=SimpleNamespace(num_blocks=BLOCKS), length=HALF)},  # type: ignore[dict-item]
        policy=RebalancePolicy(interval_s=1.0, threshold=1.25, dwell_s=0.0),
        list_nodes=lambda model_hash: [],
        service=service,  # type: ignore[arg-type]
        serving=serving,
        announcer=announcer,  # type: ignore[arg-type]
        directory=None,  # type: ignore[arg-type]
        credentials=None,
        load=load,  # type: ignore[arg-type]
        estimate=lambda manifest, start, end: TPS,
        measure=lambda: asyncio.sleep(0),
    )


def test_a_move_that_cannot_hand_its_sessions_over_is_given_up() -> None:
    service = _Service(sessions=1)  # nobody moves it: no other route serves it
    serving = ServingState(drain_deadline_s=0.0)
    asyncio.run(_rebalancer(service, serving).move(Placement(MODEL, HALF, BLOCKS)))
    assert (service.engine.start, service.engine.end) == (0, HALF)
    assert serving.state == SERVING


def test_a_drained_move_serves_the_new_span() -> None:
    async def move() -> None:
        await _rebalancer(service, serving).move(Placement(MODEL, HALF, BLOCKS))
        await asyncio.sleep(0)  # the measurement it started

    service, serving = _Service(sessions=0), ServingState(drain_deadline_s=60.0)
    heard: list[str] = []
    serving.listeners.append(heard.append)
    asyncio.run(move())
    assert (service.engine.start, service.engine.end) == (HALF, BLOCKS)
    assert heard == [DRAINING, SERVING]


def test_a_move_whose_span_does_not_load_serves_on_where_it_was() -> None:
    def fail(*args: object) -> None:
        raise MemoryError("no room for a second span")

    service, serving = _Service(sessions=0), ServingState(drain_deadline_s=60.0)
    asyncio.run(_rebalancer(service, serving, load=fail).move(Placement(MODEL, HALF, BLOCKS)))
    assert (service.engine.start, service.engine.end) == (0, HALF)
    assert serving.state == SERVING
