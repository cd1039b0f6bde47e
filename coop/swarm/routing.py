"""Route and span choice: pure functions over the nodes announced in the swarm directory.

A route is a chain of hops whose block ranges tile [0, num_blocks). Finding the fastest one is a
shortest path over block boundaries (Dijkstra): a node serving [s, e) offers an edge from every
boundary a to every boundary b with s <= a < b <= e, costing one network round trip plus the
node's per-block time for b - a blocks, inflated by the sessions it already runs for us.

Only serving nodes are routed to: a paused or draining one (coop/node/drain.py) takes no new session.
A node that refuses sessions it announced it would take (`coop.swarm.refusals`) costs more by the
opens it is expected to refuse, so a node that refuses more than it serves loses its routes.

Equal costs are broken by our load on the nodes, then at random: never by node id, which anyone
can mint to sort first (a member can announce any number of node ids; identity is `NodeKey`).

A node's per-block time is what we measured of it (`coop.swarm.measurements`). Its announced
throughput is only a prior for a node never measured, and a capped one: no node is believed
faster than the fastest node measured (before any measurement, than the median claim), so a
claim of 1e12 tokens/s buys nothing that a measurement has not shown possible.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from coop.errors import RouteUnavailable
from coop.swarm.announcement import SERVING, NodeAnnouncement
from coop.swarm.measurements import Measured
from coop.swarm.node_key import NodeKey, key_of

DEFAULT_RTT_S = 0.002  # for a node never pinged
MIN_THROUGHPUT_TPS = 0.1  # a node announcing less (or nothing) is treated as this slow
MAX_REFUSAL_PENALTY = 20.0  # a node that refuses every open costs this many times its price


@dataclass(frozen=True)
class Hop:
    node_id: str
    endpoint: str
    start: int
    end: int
    institution: str = ""

    @property
    def key(self) -> NodeKey:
        return key_of(self)


def missing_blocks(nodes: Sequence[NodeAnnouncement], num_blocks: int) -> list[tuple[int, int]]:
    """Maximal runs of blocks that no node covers."""
    covered = [False] * num_blocks
    for node in nodes:
        for index in range(max(node.start, 0), min(node.end, num_blocks)):
            covered[index] = True
    runs: list[tuple[int, int]] = []
    for index, is_covered in enumerate(covered):
        if is_covered:
            continue
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def claimed_block_s(node: NodeAnnouncement) -> float:
    """Seconds per decode token per block that the node's announced throughput claims."""
    return 1.0 / (max(node.throughput_tps, MIN_THROUGHPUT_TPS) * (node.end - node.start))


def expected_block_s(nodes: Sequence[NodeAnnouncement], measured: Mapping[NodeKey, Measured]) -> dict[NodeKey, float]:
    """Per node, the seconds per decode token per block that routing expects (one session of ours).

    A measured node's measurement; a node never measured, its claim but no less than the fastest
    measured node's time (before any measurement, the median claim, which one liar moves by one place at most).
    """
    seen = [m.block_s for m in measured.values() if m.block_s is not None]
    if seen:
        prior_floor = min(seen)
    else:
        claims = sorted(claimed_block_s(node) for node in nodes)
        prior_floor = claims[len(claims) // 2] if claims else 0.0
    expected: dict[NodeKey, float] = {}
    for node in nodes:
        known = measured.get(key_of(node), Measured()).block_s
        expected[key_of(node)] = known if known is not None else max(claimed_block_s(node), prior_floor)
    return expected


def hop_cost_s(block_s: float, blocks: int, *, active_sessions: int, rtt_s: float, refusal_rate: float = 0.0) -> float:
    """Expected seconds one decode token spends on a hop of `blocks` blocks, times the opens it takes
    to get a session from a node that refuses `refusal_rate` of them."""
    return (rtt_s + block_s * blocks * (1 + active_sessions)) * refusal_penalty(refusal_rate)


def refusal_penalty(refusal_rate: float) -> float:
    """Opens expected until one is accepted (1 / (1 - rate)), capped at MAX_REFUSAL_PENALTY."""
    return 1.0 / max(1.0 - refusal_rate, 1.0 / MAX_REFUSAL_PENALTY)


def choose_route(
    nodes: Sequence[NodeAnnouncement],
    num_blocks: int,
    *,
    measured: Mapping[NodeKey, Measured] | None = None,
    load: Mapping[NodeKey, int] | None = None,
    exclude: Collection[NodeKey] = (),
    refusal_rates: Mapping[NodeKey, float] | None = None,
    rng: random.Random | None = None,
) -> list[Hop]:
    """The cheapest chain of hops covering blocks [0, num_blocks); RouteUnavailable if none does.

    `measured`: what we measured of each node; `load`: our open sessions on each node;
    `refusal_rates`: the share of our opens each node refused lately; `rng` breaks ties.
    """
    measured = measured or {}
    load = load or {}
    refusal_rates = refusal_rates or {}
    rng = rng or random.Random()
    candidates = [n for n in nodes if key_of(n) not in exclude and n.end <= num_blocks and n.state == SERVING]
    # the first node to reach a cost keeps it: so the least loaded first, equals in random order
    usable = sorted(candidates, key=lambda n: (load.get(key_of(n), 0), rng.random()))
    gaps = missing_blocks(usable, num_blocks)
    if gaps:
        raise RouteUnavailable(gaps, num_blocks)
    block_s = expected_block_s(usable, measured)

    best: dict[int, float] = {0: 0.0}
    back: dict[int, tuple[int, NodeAnnouncement]] = {}
    queue: list[tuple[float, int]] = [(0.0, 0)]
    while queue:
        cost, boundary = heapq.heappop(queue)
        if boundary == num_blocks:
            break
        if cost > best.get(boundary, float("inf")):
            continue
        for node in usable:
            if not node.start <= boundary < node.end:
                continue
            key = key_of(node)
            rtt_s = measured.get(key, Measured()).rtt_s
            for end in range(boundary + 1, node.end + 1):
                step = hop_cost_s(
                    block_s[key],
                    end - boundary,
                    active_sessions=load.get(key, 0),
                    rtt_s=DEFAULT_RTT_S if rtt_s is None else rtt_s,
                    refusal_rate=refusal_rates.get(key, 0.0),
                )
                if cost + step < best.get(end, float("inf")) - 1e-12:
                    best[end] = cost + step
                    back[end] = (boundary, node)
                    heapq.heappush(queue, (cost + step, end))

    hops: list[Hop] = []
    boundary = num_blocks
    while boundary > 0:
        start, node = back[boundary]
        hops.append(Hop(node.node_id, node.endpoint, start, boundary, node.institution))
        boundary = start
    return hops[::-1]


def coverage_of(nodes: Sequence[NodeAnnouncement], num_blocks: int) -> list[int]:
    counts = [0] * num_blocks
    for node in nodes:
        for index in range(max(node.start, 0), min(node.end, num_blocks)):
            counts[index] += 1
    return counts
