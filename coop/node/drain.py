"""Graceful drain and owner reclaim: whether a node takes new sessions, and when it may exit.

A node is in one of three states:
- serving: it opens sessions and is routed to.
- paused: its owner paused it (`coop node pause`), it is outside its serving hours, or (on a GPU)
  local processes need the device's memory (coop/node/memory_yield.py). It opens no
  session, announces itself as paused (routes skip it), and asks the coordinators of its open
  sessions to move them (a `draining` event); what they cannot move runs to its end. It stays up.
- draining: `coop node drain` or SIGTERM. As paused, then the node exits once no session is left, or at
  the drain deadline, whichever comes first. A rebalance move (coop/node/rebalancing.py) announces
  draining too while its sessions are moved, then loads its new span and serves again.
Draining wins over paused and cannot be undone (the process is leaving); resume lifts the owner's
pause only, so outside serving hours a resumed node stays paused.

Who may change the state is decided here too (`check_owner`): the node's own institution, or a
caller on the node's machine through its control socket.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from coop.errors import InvalidInput, Unauthorized
from coop.node.serving_hours import ServingHours, within
from coop.pool.ca import ROLE_MEMBER, ROLE_NODE
from coop.pool.identity import Identity
from coop.swarm.announcement import DRAINING, PAUSED, SERVING, NodeState

log = logging.getLogger(__name__)

HOURS_CHECK_S = 30.0  # how late a node notices that its serving hours began or ended
_PROGRESS_EVERY_S = 10.0
_POLL_S = 0.1

Listener = Callable[[str], None]


def state_of(*, draining: bool, paused: bool, outside_hours: bool, yielding: bool = False) -> NodeState:
    if draining:
        return DRAINING
    return PAUSED if paused or outside_hours or yielding else SERVING


class ServingState:
    """The node's state, changed by its owner, its signals and its serving hours; listeners hear each change."""

    def __init__(self, *, drain_deadline_s: float, hours: ServingHours | None = None) -> None:
        self.drain_deadline_s = drain_deadline_s
        self.hours = hours
        self.listeners: list[Listener] = []
        self._draining = False
        self._moving = False
        self._paused = False
        self._outside_hours = False
        self._yielding = False
        self._drain_started = 0.0
        self._move_started = 0.0
        self._drain_requested = asyncio.Event()

    @property
    def state(self) -> NodeState:
        return state_of(
            draining=self._draining or self._moving,
            paused=self._paused,
            outside_hours=self._outside_hours,
            yielding=self._yielding,
        )

    @property
    def accepting(self) -> bool:
        return self.state == SERVING

    @property
    def exiting(self) -> bool:
        return self._draining

    def deadline_left_s(self) -> float:
        """Seconds until a draining node exits (or a moving one gives up its move); 0 when neither."""
        if not (self._draining or self._moving):
            return 0.0
        started = self._drain_started if self._draining else self._move_started
        return max(0.0, started + self.drain_deadline_s - time.monotonic())

    def drain(self) -> None:
        if not self._draining:
            self._drain_started = time.monotonic()
            self._change(lambda: setattr(self, "_draining", True))
            self._drain_requested.set()

    def begin_move(self) -> None:
        """Stop taking sessions and have the open ones moved, as a drain does, but to stay up."""
        self._move_started = time.monotonic()
        self._change(lambda: setattr(self, "_moving", True))

    def end_move(self) -> None:
        self._change(lambda: setattr(self, "_moving", False))

    def pause(self) -> None:
        self._change(lambda: setattr(self, "_paused", True))

    def resume(self) -> None:
        self._change(lambda: setattr(self, "_paused", False))

    def apply_hours(self, now: dt.time) -> None:
        """Pause or serve as the serving hours say for local time `now` (no hours: always serve)."""
        outside = self.hours is not None and not within(self.hours, now)
        self._change(lambda: setattr(self, "_outside_hours", outside))

    def yield_memory(self, yielding: bool) -> None:
        """Pause while local processes need the device's memory (coop/node/memory_yield.py)."""
        self._change(lambda: setattr(self, "_yielding", yielding))

    async def follow_hours(self) -> None:
        """Keep applying the serving hours (a background task; only started when hours are set)."""
        while True:
            self.apply_hours(dt.datetime.now().time())
            await asyncio.sleep(HOURS_CHECK_S)

    def _change(self, update: Callable[[], None]) -> None:
        before = self.state
        update()
        after = self.state
        if after != before:
            why = ""
            if after == PAUSED and self._outside_hours:
                why = f" (serving hours {self.hours})"
            elif after == PAUSED and self._yielding:
                why = " (local processes need the device's memory)"
            log.info("node state: %s -> %s%s", before, after, why)
            for listener in self.listeners:
                listener(after)

    async def wait_drained(self, sessions: Callable[[], int]) -> None:
        """Return once a drain was asked for and `sessions()` is 0, or its deadline passed."""
        await self._drain_requested.wait()
        if left := await self.wait_sessions_moved(sessions, "before exiting"):
            log.warning(
                "drain deadline of %g s reached with %d sessions still open: no coordinator moved them "
                "(no other route serves their blocks?); exiting, their coordinators fail them over",
                self.drain_deadline_s,
                left,
            )
        else:
            log.info("drained: no session left")

    async def wait_sessions_moved(self, sessions: Callable[[], int], then: str) -> int:
        """Wait until `sessions()` is 0 or the deadline of the drain or move passed; the sessions left."""
        told = time.monotonic()
        while (left := sessions()) and self.deadline_left_s() > 0:
            if time.monotonic() - told >= _PROGRESS_EVERY_S:
                told = time.monotonic()
                log.info("draining: %d sessions still open, %.0f s left %s", left, self.deadline_left_s(), then)
            await asyncio.sleep(_POLL_S)
        return left


def check_owner(context: grpc.aio.ServicerContext, caller: Callable[[], Identity | None], institution: str) -> None:
    """Let the node's owner through: a call on the control socket, or a certificate of `institution`
    (its member certificate or one of its node certificates). Unauthorized for anyone else."""
    if context.peer().startswith("unix:"):
        return  # the socket is reachable only by the node's own user (control_socket_path)
    identity = caller()
    if identity is None:
        raise Unauthorized("a node without a member bundle takes control only on its control socket, on its machine")
    if identity.institution != institution or identity.role not in (ROLE_MEMBER, ROLE_NODE):
        raise Unauthorized(f"only the node's own institution {institution!r} may control it, not {identity.describe()}")


def control_socket_path(node_id: str) -> Path:
    """Where a node listens for its owner's control calls: a directory only this user can enter."""
    return Path(tempfile.gettempdir()) / f"coop-{os.getuid()}" / f"{node_id}.sock"


def prepare_control_socket(path: Path) -> None:
    """Make the socket's directory private (0700, ours) and clear a stale socket a crashed node left."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.parent.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise InvalidInput(f"{path.parent} must be a directory of this user that nobody else may enter (mode 0700)")
    if path.is_socket():
        path.unlink()
