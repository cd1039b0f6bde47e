"""Where a node should serve: a pure decision over the live announcements of every model it can serve.

The pool's health, per model, is read block by block: a block's capacity is the summed throughput of
the serving nodes that cover it (a paused or draining node covers nothing: it takes no new session).
The pool is better off with fewer uncovered blocks, then with a higher bottleneck: the lowest capacity
of any covered block, divided by the model's demand, taken over all models. A model's demand is 1 plus
the sessions it carries: every session's route covers each block once, so the sessions the nodes of
one block announce add up to the model's sessions; the (lower) median over blocks is taken, so a node
that inflates its count moves the figure only if it covers most of the model's blocks. A node compares
the pool as it is with the pool after it left its span for any other window (of any model it can
serve) and moves only when

- the move covers blocks that nobody serves, without uncovering any; or
- it covers as many blocks and raises the bottleneck by more than `threshold` (e.g. 1.25x), and the
  span it leaves does not become the new bottleneck, weaker than the one it takes (hysteresis: the
  pool's next move would be back to it). A tie is no bottleneck of its own: 3 nodes against 1 may
  become 2 against 2.

Claimed throughput is capped as routing caps it (`expected_block_s`): no node counts as faster per
block than the median claim, so one peer announcing 1e12 tokens/s cannot pull every node away from it.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coop.errors import InvalidInput
from coop.swarm.announcement import SERVING, NodeAnnouncement
from coop.swarm.node_key import key_of
from coop.swarm.routing import expected_block_s

DEFAULT_THRESHOLD = 1.25


@dataclass(frozen=True)
class Placement:
    """Blocks [start, end) of one model."""

    model_hash: str
    start: int
    end: int


@dataclass(frozen=True)
class Candidate:
    """A model this node can serve, and what it would bring to it."""

    model_hash: str
    num_blocks: int
    length: int  # how many blocks of it the node can hold
    throughput_tps: float  # what the node would deliver through `length` blocks of it


@dataclass(frozen=True)
class Health:
    uncovered_blocks: int
    bottleneck_tps: float  # over covered blocks, per unit of demand; 0 when nothing is covered


def block_capacity(nodes: Sequence[NodeAnnouncement], num_blocks: int) -> list[float]:
    """Per block, the summed throughput of the serving nodes covering it, each claim capped as routing caps it."""
    serving = [n for n in nodes if n.state == SERVING and n.end <= num_blocks]
    block_s = expected_block_s(serving, {})
    capacity = [0.0] * num_blocks
    for node in serving:
        tps = 1.0 / (block_s[key_of(node)] * (node.end - node.start))
        for index in range(node.start, node.end):
            capacity[index] += tps
    return capacity


def demand_of(nodes: Sequence[NodeAnnouncement], num_blocks: int) -> float:
    """1 + the sessions a model carries: the median over its blocks of the sessions announced on them."""
    per_block = [0] * num_blocks
    for node in nodes:
        for index in range(node.start, min(node.end, num_blocks)):
            per_block[index] += node.active_sessions
    return 1.0 + statistics.median_low(per_block) if per_block else 1.0


def health(capacities: Mapping[str, list[float]], demand: Mapping[str, float]) -> Health:
    uncovered = sum(1 for capacity in capacities.values() for tps in capacity if tps <= 0)
    covered = [tps / demand[model] for model, capacity in capacities.items() for tps in capacity if tps > 0]
    return Health(uncovered, min(covered, default=0.0))


def better(after: Health, before: Health, threshold: float) -> bool:
    if after.uncovered_blocks != before.uncovered_blocks:
        return after.uncovered_blocks < before.uncovered_blocks
    return after.bottleneck_tps > threshold * before.bottleneck_tps


def decide(
    node_id: str,
    current: Placement | None,
    candidates: Sequence[Candidate],
    live: Mapping[str, Sequence[NodeAnnouncement]],
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> Placement | None:
    """Where node `node_id` should move, or None to stay.

    `live`: the announcements of each candidate model (this node's own is ignored). With `current`
    None (a node starting with `--blocks auto`) it returns the best placement, whatever it improves.
    """
    if threshold < 1.0:
        raise InvalidInput(f"the rebalance threshold must be at least 1, got {threshold}")
    if not candidates:
        raise InvalidInput("a node needs at least one model to serve")
    by_model = {c.model_hash: c for c in candidates}
    if current is not None and current.model_hash not in by_model:
        raise InvalidInput(f"the current model {current.model_hash} is not one of the candidates")
    others = {
        c.model_hash: block_capacity([n for n in live.get(c.model_hash, ()) if n.node_id != node_id], c.num_blocks)
        for c in candidates
    }
    demand = {c.model_hash: demand_of(live.get(c.model_hash, ()), c.num_blocks) for c in candidates}

    def with_me(place: Placement) -> dict[str, list[float]]:
        capacities = dict(others)
        capacity = list(capacities[place.model_hash])
        for index in range(place.start, place.end):
            capacity[index] += by_model[place.model_hash].throughput_tps
        capacities[place.model_hash] = capacity
        return capacities

    options = [
        Placement(c.model_hash, start, start + min(c.length, c.num_blocks))
        for c in candidates
        for start in range(c.num_blocks - min(c.length, c.num_blocks) + 1)
    ]
    # the best option first: fewest uncovered blocks, highest bottleneck, then the thinnest window (so that
    # the next node's move has the most to gain), then the order given (first model, leftmost start)
    scored = []
    for place in options:
        capacities = with_me(place)
        scored.append((health(capacities, demand), capacities, place))
    after, capacities, best = min(
        scored,
        key=lambda item: (item[0].uncovered_blocks, -item[0].bottleneck_tps, _weakest(others, item[2], demand)),
    )
    if current is None:
        return best
    if best == current:
        return None
    before = health(with_me(current), demand)
    if not better(after, before, threshold):
        return None
    if after.uncovered_blocks == before.uncovered_blocks:
        left = _weakest(capacities, current, demand)
        if left <= after.bottleneck_tps and left < _weakest(capacities, best, demand):
            return None  # the span left behind would become the new bottleneck: the place to move back to
    return best


def _weakest(capacities: Mapping[str, list[float]], place: Placement, demand: Mapping[str, float]) -> float:
    """The lowest capacity per unit of demand over `place`'s blocks."""
    return min(capacities[place.model_hash][place.start : place.end]) / demand[place.model_hash]
