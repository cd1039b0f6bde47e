"""Admission of requests when the pool is saturated: waiting requests go in fair-share order.

The coordinator runs at most `capacity` sessions at once. Below that, a request starts at once,
whoever sends it: an idle pool serves anyone at full speed. At capacity, requests wait; each time
a session ends, the waiting request whose institution has the highest fair-share factor *now*
starts (ties: the earliest), so the order follows usage as it changes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from coop.errors import CreditExhausted
from coop.ledger.models import flops_to_credits
from coop.pipeline.charge import Charge, Meter, Payer

log = logging.getLogger(__name__)


@dataclass
class _Waiter:
    institution: str
    arrival: int
    future: asyncio.Future[None] = field(repr=False)


class FairShareAdmission:
    def __init__(self, capacity: int, factors: Callable[[], Mapping[str, float]]) -> None:
        """`factors`: every institution's current fair-share factor (higher goes first; unknown: 1.0)."""
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._factors = factors
        self._active = 0
        self._waiters: list[_Waiter] = []
        self._arrival = itertools.count()
        self.admitted_at_once: Counter[str] = Counter()

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def admit(self, institution: str) -> AsyncIterator[float]:
        """Hold a session slot for the block; yields the seconds spent waiting for it."""
        waited_s = 0.0
        if self._active < self.capacity and not self._waiters:
            self._active += 1
            self.admitted_at_once[institution] += 1
        else:
            loop = asyncio.get_running_loop()
            arrived = loop.time()
            waiter = _Waiter(institution, next(self._arrival), loop.create_future())
            self._waiters.append(waiter)
            try:
                await waiter.future
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not waiter.future.cancelled():
                    self._release()  # admitted just as we were cancelled: hand the slot on
                raise
            waited_s = loop.time() - arrived
        try:
            yield waited_s
        finally:
            self._release()

    def _release(self) -> None:
        self._waiters = [w for w in self._waiters if not w.future.done()]  # cancelled meanwhile
        if not self._waiters:
            self._active -= 1
            return
        factors = self._current_factors()
        best = max(self._waiters, key=lambda w: (factors.get(w.institution, 1.0), -w.arrival))
        self._waiters.remove(best)
        best.future.set_result(None)  # the slot passes straight to it

    def _current_factors(self) -> Mapping[str, float]:
        """Failing factors must not lose the slot being handed on: then everyone is equal (arrival order)."""
        try:
            return self._factors()
        except Exception:
            log.exception("fair-share factors failed; admitting in arrival order")
            return {}


@dataclass(frozen=True)
class Admitted:
    charge: Charge  # who pays, at what priority, metered where
    waited_s: float  # how long the request waited for its session slot


class RequestAdmission:
    """Every generation request passes here: the consumer's credit floor first, then a session slot."""

    def __init__(
        self,
        admission: FairShareAdmission,
        *,
        default_consumer: str,
        credit_state: Callable[[str], tuple[int, int | None]] | None = None,
        priority: Callable[[str], float] | None = None,
        meter: Meter | None = None,
    ) -> None:
        """`default_consumer`: who pays for requests without an API key (the coordinator's institution).
        `credit_state`: institution -> (balance, floor or None) in FLOPs; None = no floors.
        `priority`: institution -> fair-share factor now; `meter`: where admitted sessions write down their steps."""
        self.admission = admission
        self.default_consumer = default_consumer
        self._credit_state = credit_state
        self._priority = priority
        self._meter = meter

    def consumer(self, institution: str | None) -> str:
        """Who pays for a request of institution (None: a request without an API key)."""
        return institution or self.default_consumer

    @asynccontextmanager
    async def enter(
        self, institution: str | None, api_key_id: str = "", model_hash: str = ""
    ) -> AsyncIterator[Admitted]:
        """Admit a request of institution (None: the coordinator's own), made with the API key of this id
        ("" = none) for the model of this hash, and say who pays for it."""
        consumer = self.consumer(institution)
        if self._credit_state is not None:
            balance, floor = await asyncio.to_thread(self._credit_state, consumer)
            if floor is not None and balance < floor:
                raise CreditExhausted(
                    f"{consumer} has {flops_to_credits(balance):.6g} credits, below its credit floor of "
                    f"{flops_to_credits(floor):.6g}: contribute compute (run a node) or ask the pool admin "
                    "for a grant (`coop ledger grant`)"
                )
        async with self.admission.admit(consumer) as waited_s:
            priority = self._priority(consumer) if self._priority is not None else 0.0
            yield Admitted(Charge(Payer(consumer, api_key_id, model_hash, priority), self._meter), waited_s)
