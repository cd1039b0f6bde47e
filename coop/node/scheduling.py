"""Which queued step runs next on a node: the one whose session has the highest fair-share priority.

The engine computes one step at a time; steps that arrive while it is busy wait here. Among the
waiting steps the highest priority goes first, ties in arrival order. A lone step never waits.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PriorityGate:
    """A lock whose waiters are woken by priority (highest first), then by arrival."""

    def __init__(self) -> None:
        self._busy = False
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    @property
    def queued(self) -> int:
        return sum(1 for *_, f in self._waiters if not f.done())

    @asynccontextmanager
    async def hold(self, priority: float) -> AsyncIterator[None]:
        if self._busy or self._waiters:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (-priority, next(self._arrival), waiter))
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._pass_on()  # we were handed the gate just as we were cancelled
                raise
        else:
            self._busy = True
        try:
            yield
        finally:
            self._pass_on()

    def _pass_on(self) -> None:
        while self._waiters:
            *_, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)  # ownership passes straight on: _busy stays True
                return
        self._busy = False
