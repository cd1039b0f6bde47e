"""Owner reclaim on a GPU: the node steps aside when local processes need the device's memory.

A lab shares its GPU with the pool; when its own jobs start, they must get the memory, and the
pool's users must not see an error. The node polls how much device memory is available to others
(free memory plus what this process holds cached but unused). Below `--gpu-yield-below-gib` it pauses,
the same planned move as `coop node pause` (no new session; coordinators move the open ones), and
once no session is left it hands its cached memory back to the device. It serves again after the
available memory has stayed at twice the threshold for `resume_after_s`: the hysteresis keeps a
job that allocates in waves from toggling the node in and out of routes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from coop.node.drain import ServingState

log = logging.getLogger(__name__)

POLL_S = 2.0
RESUME_FACTOR = 2  # serve again only with this many times the threshold available


@dataclass
class MemoryYield:
    """Whether to yield, from a series of (available bytes, time) readings. Pure: tested without a GPU."""

    threshold_bytes: int
    resume_after_s: float
    yielding: bool = False
    _plenty_since: float | None = None

    def update(self, available_bytes: int, now: float) -> bool:
        if available_bytes < self.threshold_bytes:
            self.yielding, self._plenty_since = True, None
        elif self.yielding and available_bytes >= RESUME_FACTOR * self.threshold_bytes:
            self._plenty_since = now if self._plenty_since is None else self._plenty_since
            if now - self._plenty_since >= self.resume_after_s:
                self.yielding, self._plenty_since = False, None
        else:
            self._plenty_since = None
        return self.yielding


def cuda_available_bytes(device: torch.device) -> int:
    """Device memory other processes could take now: free, plus this process's cached-but-unused blocks."""
    free, _total = torch.cuda.mem_get_info(device)
    cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached_unused)


async def follow_memory(
    serving: ServingState,
    watch: MemoryYield,
    available: Callable[[], int],
    sessions: Callable[[], int],
    release: Callable[[], None],
    *,
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Keep the node paused while `watch` says yield; `release` the cache once its sessions are gone."""
    released = False
    while True:
        yielding = watch.update(available(), clock())
        serving.yield_memory(yielding)
        if yielding and not released and sessions() == 0:
            release()
            released = True
            log.info("yielded the device: no session left, cached memory returned")
        released = released and yielding
        await asyncio.sleep(poll_s)
