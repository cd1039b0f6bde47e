"""What this coordinator measured of each node: round trips and decode step times, as moving averages.

Throughput is measured, not believed. A node's announced throughput is its own claim; routing
prices a node by what we saw of it instead: the round trip of an Info call, and the time of every
decode step we sent through a route it was on.

We see whole routes only (a step goes to the first hop, the result comes back from the last), so
a route's step time is split among its hops (`attribute_step`): in proportion to what each was
expected to cost, and never less than what the route's time leaves once its measured partners
are paid their expected share, so a slow node cannot pass its time on to the nodes beside it.
The network is part of each hop's time: subtracting a noisy round trip could leave a node
measured as free, and the fastest measured node caps every claim (`routing.expected_block_s`).

Step times are kept per block and per session of ours: a node that ran L of our sessions when
the step completed is taken to be L times slower than with one, and routing multiplies back by
the sessions it would then run.

Everything is kept per `NodeKey`: a node id is unique only within its institution, so a member
naming its node like another member's node must not share, or poison, that node's figures.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

from coop.swarm.node_key import NodeKey

SMOOTHING = 0.3  # weight of a new sample in a moving average


@dataclass(frozen=True)
class Measured:
    rtt_s: float | None = None  # one Info round trip; None until a ping is answered
    block_s: float | None = (
        None  # seconds a decode token spends per block, with one session of ours; None if never routed
    )


def attribute_step(
    seconds: float, expected_s: Mapping[NodeKey, float], measured: Collection[NodeKey]
) -> dict[NodeKey, float]:
    """Seconds of one route step that each node of the route spent.

    `expected_s`: per node of the route, the seconds it was expected to take (estimate x blocks x
    sessions). `measured`: the nodes whose estimates come from measurements, not claims.
    """
    total = sum(expected_s.values())
    spent: dict[NodeKey, float] = {}
    for key, expected in expected_s.items():
        share = seconds * expected / total if total > 0 else seconds / len(expected_s)
        partners = [other for other in expected_s if other != key]
        if all(other in measured for other in partners):
            share = max(share, seconds - sum(expected_s[other] for other in partners))
        spent[key] = share
    return spent


class Measurements:
    """Per node, what we measured; the swarm view feeds it and routing reads `nodes`."""

    def __init__(self, smoothing: float = SMOOTHING) -> None:
        self.smoothing = smoothing
        self.nodes: dict[NodeKey, Measured] = {}

    def _average(self, previous: float | None, sample: float) -> float:
        return sample if previous is None else (1 - self.smoothing) * previous + self.smoothing * sample

    def rtt_measured(self, key: NodeKey, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        known = self.nodes.get(key, Measured())
        self.nodes[key] = replace(known, rtt_s=self._average(known.rtt_s, seconds))

    def step_measured(
        self,
        seconds: float,
        blocks: Mapping[NodeKey, int],
        *,
        block_s: Mapping[NodeKey, float],
        sessions: Mapping[NodeKey, int],
    ) -> None:
        """One decode step took `seconds` through a route whose nodes ran `blocks` blocks each.

        `block_s`: the current estimate for each node (routing's, claims capped); `sessions`: our
        open sessions on each node when the step completed, this one included.
        """
        if not math.isfinite(seconds) or seconds < 0 or not blocks or any(n not in block_s for n in blocks):
            return  # a node that left the directory has no estimate to share the time by
        load = {key: max(sessions.get(key, 0), 1) for key in blocks}
        expected = {key: block_s[key] * blocks[key] * load[key] for key in blocks}
        measured = {key for key, m in self.nodes.items() if m.block_s is not None}
        for key, spent in attribute_step(seconds, expected, measured).items():
            sample = spent / (blocks[key] * load[key])
            known = self.nodes.get(key, Measured())
            self.nodes[key] = replace(known, block_s=self._average(known.block_s, sample))

    def keep_only(self, keys: Collection[NodeKey]) -> None:
        """Forget nodes no longer listed, so node ids that come and go cannot grow this without bound."""
        self.nodes = {key: m for key, m in self.nodes.items() if key in keys}
