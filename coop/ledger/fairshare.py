"""Fair share: an institution's priority from its decayed usage against its decayed contribution.

Slurm's fair-share factor, with contribution in the place of an allocation:

    F = 2 ** (-U / S)

U is the institution's share of the pool's decayed usage, S its share of the pool's decayed
contribution (compute its nodes delivered). Both decay with a half-life, so last month's
generosity fades as last month's consumption does. F is 1 for an institution that has used
nothing, 0.5 for one that used exactly its contributed share, and falls towards 0 the more it
takes beyond what it gives. When requests wait, the highest F goes first; at equilibrium each
institution's usage share equals its contribution share.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DEFAULT_HALF_LIFE_S = 7 * 24 * 3600.0
# The contribution share an institution that gave nothing is treated as having, so F stays defined.
MIN_SHARE = 1e-6
_REBASE_HALF_LIVES = 256.0  # keeps 2 ** exponent far from float overflow


def fair_share_factor(usage_share: float, contribution_share: float) -> float:
    return float(2.0 ** (-usage_share / max(contribution_share, MIN_SHARE)))


def fair_share_factors(usage: Mapping[str, float], contribution: Mapping[str, float]) -> dict[str, float]:
    """F for every institution named in either mapping (amounts already decayed)."""
    total_usage = sum(usage.values())
    total_contribution = sum(contribution.values())
    factors = {}
    for name in set(usage) | set(contribution):
        u = usage.get(name, 0.0) / total_usage if total_usage > 0 else 0.0
        s = contribution.get(name, 0.0) / total_contribution if total_contribution > 0 else 0.0
        factors[name] = fair_share_factor(u, s)
    return factors


@dataclass
class DecayedTotals:
    """Per-name sums where an amount added at time t weighs 2 ** (-(now - t) / half_life_s)."""

    half_life_s: float
    reference_s: float = 0.0  # amounts are stored as of this time
    values: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, amount: float, at_s: float) -> None:
        if (at_s - self.reference_s) / self.half_life_s > _REBASE_HALF_LIVES:
            self._rebase(at_s)
        self.values[name] = self.values.get(name, 0.0) + amount * self._weight(at_s)

    def _rebase(self, reference_s: float) -> None:
        shrink = math.exp2(-(reference_s - self.reference_s) / self.half_life_s)  # underflows to 0, never over
        self.values = {name: value * shrink for name, value in self.values.items()}
        self.reference_s = reference_s

    def snapshot(self, now_s: float) -> dict[str, float]:
        if (now_s - self.reference_s) / self.half_life_s > 1000:  # everything has decayed to nothing
            return dict.fromkeys(self.values, 0.0)
        scale = self._weight(now_s)
        return {name: value / scale for name, value in self.values.items()}

    def _weight(self, at_s: float) -> float:
        # Relative to a fixed reference time, so adding is O(1); exponents stay small for years.
        return math.exp2((at_s - self.reference_s) / self.half_life_s)


class FairShare:
    """The live fair-share state of a coordinator: seeded from the ledger, fed by every step served."""

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S, *, now_s: float = 0.0) -> None:
        self.half_life_s = half_life_s
        self._usage = DecayedTotals(half_life_s, now_s)
        self._contribution = DecayedTotals(half_life_s, now_s)
        self._lock = threading.Lock()

    def record(self, provider: str | None, consumer: str, flops: float, at_s: float) -> None:
        """`flops` of compute that provider's node delivered for consumer (provider None: not a member)."""
        with self._lock:
            self._usage.add(consumer, flops, at_s)
            if provider is not None:
                self._contribution.add(provider, flops, at_s)

    def seed(self, flows: Iterable[tuple[float, str, str, int]]) -> None:
        """(time_s, provider, consumer, flops) of booked receipts."""
        for at_s, provider, consumer, flops in flows:
            self.record(provider, consumer, flops, at_s)

    def factors(self, now_s: float) -> dict[str, float]:
        with self._lock:
            usage, contribution = self._usage.snapshot(now_s), self._contribution.snapshot(now_s)
        return fair_share_factors(usage, contribution)

    def factor(self, institution: str, now_s: float) -> float:
        """1.0 for an institution the pool has not seen yet."""
        return self.factors(now_s).get(institution, 1.0)
