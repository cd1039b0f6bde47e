"""What the admin view reads: the pool directory, the ledger, and live views the coordinator owns.

Everything but `pool_dir` and `ledger` is optional, so the view also runs beside a coordinator that
does not meter (it then shows what the ledger knows, and says what it cannot show).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from coop.admin.auth import SignInThrottle
from coop.ledger.fairshare import FairShare
from coop.ledger.store import Ledger
from coop.swarm.announcement import NodeAnnouncement
from coop.swarm.node_key import NodeKey

TOKEN_WINDOW_S = 15 * 60.0  # how far back the tokens/s chart looks


class SwarmProvider(Protocol):
    """The part of the coordinator's live swarm view the admin view reads (`SwarmView` is one)."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def load(self) -> Mapping[NodeKey, int]:
        """Sessions this coordinator has open on each node, by (institution, node id)."""
        ...

    @property
    def sessions_open(self) -> int:
        """Sessions this coordinator has open: each once, not once per node of its route."""
        ...

    def live_nodes(self) -> list[NodeAnnouncement]: ...


TokenSamples = Callable[[], Sequence[tuple[float, float]]]
"""(unix time in seconds, tokens served at that moment) pairs of the last minutes."""


class TokenRateMeter:
    """Tokens served, as timestamped samples of the last `window_s`: feed `add`, hand `samples` to the view."""

    def __init__(self, window_s: float = TOKEN_WINDOW_S, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, tokens: float, at_s: float | None = None) -> None:
        now = self._clock() if at_s is None else at_s
        with self._lock:
            self._samples.append((now, tokens))
            self._trim(now)

    def samples(self) -> list[tuple[float, float]]:
        now = self._clock()
        with self._lock:
            self._trim(now)
            return [s for s in self._samples if s[0] >= now - self.window_s]  # `at_s` may come out of order

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()


class CounterRate:
    """Samples of a cumulative counter (e.g. tokens served so far), taken whenever the view reads them.

    What the counter gained between two reads is spread evenly over the time between them, in steps
    of `step_s`: while an overview is open (it re-reads every few seconds) the chart is as fine as
    its refresh; a view opened after a quiet spell shows the mean rate since the previous read.
    """

    def __init__(
        self,
        read: Callable[[], int],
        window_s: float = TOKEN_WINDOW_S,
        step_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._read = read
        self._step_s = step_s
        self._clock = clock
        self._meter = TokenRateMeter(window_s, clock)
        self._last: tuple[float, int] | None = None
        self._lock = threading.Lock()

    def samples(self) -> list[tuple[float, float]]:
        now, value = self._clock(), self._read()
        with self._lock:
            if self._last is not None and value > self._last[1] and now > self._last[0]:
                then, before = self._last
                start = max(then, now - self._meter.window_s)
                steps = max(1, math.ceil((now - start) / self._step_s))
                share = (value - before) * (now - start) / (now - then) / steps
                for index in range(steps):
                    self._meter.add(share, at_s=start + (index + 0.5) * (now - start) / steps)
            self._last = (now, value)
        return self._meter.samples()


class NodePresence:
    """Since when each live node has been seen online without a gap, as far as this process observed.

    Nodes announce no start time, so uptime is measured by the observer: updated whenever the view
    reads the swarm (every few seconds while an overview is open).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._since: dict[NodeKey, float] = {}
        self._lock = threading.Lock()

    def observe(self, live: Sequence[NodeKey]) -> dict[NodeKey, float]:
        """Online-since times (unix seconds) of exactly the given nodes."""
        now = self._clock()
        with self._lock:
            self._since = {key: self._since.get(key, now) for key in live}
            return dict(self._since)


@dataclass
class AdminContext:
    pool_dir: Path  # `coop pool init`'s directory: admin token hash, members, API keys, revocations
    ledger: Ledger
    # the live view; a coordinator serving several models gives each model's, by model name (one
    # coverage map each); None: no live view (coverage map and sessions are empty)
    swarm: SwarmProvider | Mapping[str, SwarmProvider] | None = None
    fair_share: Callable[[str], float] | None = None  # institution -> fair-share factor F in [0, 1]
    token_samples: TokenSamples | None = None  # e.g. `TokenRateMeter.samples`
    refresh_s: float = 5.0  # how often an open overview re-reads the live parts (with JavaScript)
    actor: str = "admin (web)"  # who admin actions are recorded as in the audit log
    session_ttl_s: float = 12 * 3600.0  # a login lasts this long, then the admin signs in again
    secure_cookies: bool | None = None  # None: Secure flag when the request came over https
    presence: NodePresence = field(default_factory=NodePresence)
    # requests the coordinator's API refused since it started, by error code (`Rejections.snapshot`)
    rejections: Callable[[], Mapping[str, int]] | None = None
    sign_in: SignInThrottle = field(default_factory=SignInThrottle)  # wrong admin tokens, per client
    receipt_collection: Callable[[], Mapping[str, Any]] | None = None  # the collector's counters

    def swarms(self) -> dict[str, SwarmProvider]:
        """Each model's live view by model name ("": the one model of a single view)."""
        if self.swarm is None:
            return {}
        if isinstance(self.swarm, Mapping):
            return dict(self.swarm)
        return {"": self.swarm}

    @classmethod
    def for_coordinator(
        cls,
        pool_dir: Path,
        ledger: Ledger,
        fair_share: FairShare,
        tokens_served: Callable[[], int],
        swarm: SwarmProvider | Mapping[str, SwarmProvider],
        *,
        rejections: Callable[[], Mapping[str, int]] | None = None,
        sign_in: SignInThrottle | None = None,
        receipt_collection: Callable[[], Mapping[str, Any]] | None = None,
    ) -> AdminContext:
        """The view of a coordinator that keeps accounts (`coop coordinator start --member ... --pool-dir ...`).

        `tokens_served` reads the coordinator's running count of tokens, sampled into the tokens/s chart;
        `rejections` its count of refused requests by error code.
        """
        return cls(
            pool_dir=pool_dir,
            ledger=ledger,
            swarm=swarm,
            fair_share=lambda institution: fair_share.factor(institution, time.time()),
            token_samples=CounterRate(tokens_served).samples,
            rejections=rejections,
            sign_in=sign_in or SignInThrottle(),
            receipt_collection=receipt_collection,
        )
