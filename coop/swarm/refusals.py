"""How often each node declined the sessions we opened on it lately: routing's refusal rate.

A refusal (draining, paused, a cache or session limit) is not a liveness failure and never makes a
node a suspect, but a node that announces a span and then refuses to serve it must not keep
winning routes: each open it refuses costs a session a round trip. So every open is an outcome,
refused (1) or served (0), averaged per node; routing prices a node by the opens it is expected
to take (`coop.swarm.routing.refusal_penalty`). A node's first outcome is its rate: a node id
minted to refuse is priced as a refuser after its first refusal.

The rate fades with a half-life, so a node that was full for a while wins routes again, and one
that has not been tried lately is not held to an old record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection

from coop.swarm.node_key import NodeKey

SMOOTHING = 0.3  # weight of a new outcome
HALF_LIFE_S = 60.0  # a rate halves every minute without new outcomes


class RefusalRates:
    """Per node, a moving average of refused opens, fading towards zero over time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, half_life_s: float = HALF_LIFE_S) -> None:
        self._clock = clock
        self._half_life_s = half_life_s
        self._rates: dict[NodeKey, tuple[float, float]] = {}  # rate, when it was last updated

    def refused(self, key: NodeKey) -> None:
        self._outcome(key, 1.0)

    def served(self, key: NodeKey) -> None:
        self._outcome(key, 0.0)

    def rates(self) -> dict[NodeKey, float]:
        now = self._clock()
        return {key: self._faded(rate, at, now) for key, (rate, at) in self._rates.items()}

    def keep_only(self, keys: Collection[NodeKey]) -> None:
        """Forget nodes no longer listed, so node ids that come and go cannot grow this without bound."""
        self._rates = {key: value for key, value in self._rates.items() if key in keys}

    def _outcome(self, key: NodeKey, sample: float) -> None:
        now = self._clock()
        known = self._rates.get(key)
        rate = sample if known is None else (1 - SMOOTHING) * self._faded(*known, now) + SMOOTHING * sample
        self._rates[key] = (rate, now)

    def _faded(self, rate: float, at: float, now: float) -> float:
        return rate * math.pow(0.5, max(now - at, 0.0) / self._half_life_s)
