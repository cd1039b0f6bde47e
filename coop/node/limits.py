"""What one peer can make a node hold, and the refusals that keep it bounded.

A node serves everyone in the pool, so every resource a caller can pin is budgeted per caller:
sessions per coordinator (their KV-cache reservations are shared per consuming institution, see
coop/node/cache_shares.py); steps accepted but not yet run and
pushed (their count and their bytes) per caller of Forward (the coordinator for a route's first
node, the previous node otherwise); and results waiting for a coordinator to read them, in bytes,
against the same byte budget of that coordinator. Whatever one peer does, the others keep their
share.

Every limit, when hit, is counted under its setting's name, which `coop node status` shows.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TypeVar

from coop.config import NodeSettings
from coop.errors import CoopError, InFlightLimitExceeded, SessionLimitExceeded

E = TypeVar("E", bound=CoopError)


@dataclass(frozen=True)
class NodeLimits:
    """The limits of coop.config.NodeSettings a running node enforces (see there for each one)."""

    max_sessions_per_peer: int
    idle_timeout_s: float
    max_in_flight_bytes_per_peer: int
    max_steps_in_flight_per_peer: int
    max_steps_in_flight_per_session: int
    max_events_per_session: int
    max_channels: int
    max_batch_steps: int = 1  # 1: every step runs alone
    batch_gather_s: float = 0.02

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> NodeLimits:
        return cls(
            max_sessions_per_peer=settings.max_sessions_per_peer,
            idle_timeout_s=settings.idle_timeout_s,
            max_in_flight_bytes_per_peer=settings.max_in_flight_bytes_per_peer,
            max_steps_in_flight_per_peer=settings.max_steps_in_flight_per_peer,
            max_steps_in_flight_per_session=settings.max_steps_in_flight_per_session,
            max_events_per_session=settings.max_events_per_session,
            max_channels=settings.max_channels,
            max_batch_steps=settings.max_batch_steps,
            batch_gather_s=settings.batch_gather_s,
        )


@dataclass
class Held:
    """What one peer holds on the node right now."""

    sessions: int = 0
    steps: int = 0  # accepted from the peer, not yet run and pushed
    bytes: int = 0  # of those steps' hidden states, and of results the peer has not read yet


class PeerBudgets:
    """Per-peer accounting against NodeLimits.

    Each `take_*` checks and takes in one synchronous call (no await between), so requests that
    race on the event loop cannot all slip under a limit; each `give_*` returns what was taken.
    """

    def __init__(self, limits: NodeLimits) -> None:
        self.limits = limits
        self._held: dict[str, Held] = {}
        self.limited: collections.Counter[str] = collections.Counter()  # setting name -> times hit

    def refuse(self, setting: str, error: E) -> E:
        """Count a refusal (or a session closed) under the setting that caused it."""
        self.limited[setting] += 1
        return error

    def take_session(self, peer: str) -> None:
        held = self._held.get(peer) or Held()
        if held.sessions >= self.limits.max_sessions_per_peer:
            raise self.refuse(
                "max_sessions_per_peer",
                SessionLimitExceeded(
                    f"{peer} already has {held.sessions} sessions open on this node, the limit per peer"
                ),
            )
        held.sessions += 1
        self._held[peer] = held

    def give_session(self, peer: str) -> None:
        held = self._held[peer]
        held.sessions -= 1
        self._forget_if_idle(peer, held)

    def take_step(self, peer: str, step_bytes: int) -> None:
        held = self._held.get(peer) or Held()
        if held.steps >= self.limits.max_steps_in_flight_per_peer:
            raise self.refuse(
                "max_steps_in_flight_per_peer",
                InFlightLimitExceeded(
                    f"{peer} already has {held.steps} steps in flight on this node, the limit per peer; "
                    "wait for their results"
                ),
            )
        if held.bytes + step_bytes > self.limits.max_in_flight_bytes_per_peer:
            raise self.refuse(
                "max_in_flight_bytes_per_peer",
                InFlightLimitExceeded(
                    f"{peer} already has {held.bytes:,} bytes of steps and results in flight on this node; this "
                    f"step's {step_bytes:,} would exceed the {self.limits.max_in_flight_bytes_per_peer:,} bytes one "
                    "peer may have in flight; wait for their results"
                ),
            )
        held.steps += 1
        held.bytes += step_bytes
        self._held[peer] = held

    def give_step(self, peer: str, step_bytes: int) -> None:
        held = self._held[peer]
        held.steps -= 1
        self.give_bytes(peer, step_bytes)

    def take_result(self, peer: str, event_bytes: int) -> bool:
        """Hold a result for `peer` to read; False if that would exceed its bytes in flight."""
        held = self._held.get(peer) or Held()
        if held.bytes + event_bytes > self.limits.max_in_flight_bytes_per_peer:
            return False
        held.bytes += event_bytes
        self._held[peer] = held
        return True

    def give_bytes(self, peer: str, n_bytes: int) -> None:
        held = self._held[peer]
        held.bytes -= n_bytes
        self._forget_if_idle(peer, held)

    def _forget_if_idle(self, peer: str, held: Held) -> None:
        if held == Held():
            del self._held[peer]

    @property
    def steps_in_flight(self) -> int:
        return sum(h.steps for h in self._held.values())

    @property
    def bytes_in_flight(self) -> int:
        return sum(h.bytes for h in self._held.values())
