"""Who gets a node's KV cache: anyone while it has room, an equal share per institution when it is full.

A node's cache is work-conserving: one coordinator, or one consuming institution, may reserve all
of it while nobody else asks. Shares are enforced only under contention, per consuming institution
(the one that pays for the session, which its coordinator names in the session's open), never per
coordinator: a pool with one coordinator still uses every byte.

When an open does not fit in the free cache, its institution may take room from others only while
it holds less than its fair share (the budget split equally among the institutions holding cache,
itself included). The room comes from idle sessions (no step in flight) of institutions above their
share, longest idle first, each closed with `SessionDropped`; an institution at or above its share
gets only free room, and a refusal says so with a capacity error, never a liveness failure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Holding:
    """One open session's reservation, as the share decision sees it."""

    session_id: str
    consumer: str  # the institution it counts against
    cache_bytes: int
    idle_since: float | None  # time.monotonic() of its last step; None while a step is in flight


def fair_share_bytes(budget_bytes: int, consumers: Iterable[str]) -> int:
    """Each contending institution's share of the budget: an equal split."""
    return budget_bytes // max(len(set(consumers)), 1)


def held_by_consumer(holdings: Iterable[Holding]) -> dict[str, int]:
    held: dict[str, int] = {}
    for holding in holdings:
        held[holding.consumer] = held.get(holding.consumer, 0) + holding.cache_bytes
    return held


@dataclass(frozen=True)
class RoomPlan:
    """How `consumer` gets `need` bytes: `evict` these sessions first ([]: the free room suffices), or
    `refused` (then `share_bytes` says what it was entitled to, and `over_share` whether it holds that)."""

    evict: list[str]
    refused: bool
    share_bytes: int
    over_share: bool


def plan_room(budget_bytes: int, free_bytes: int, consumer: str, need_bytes: int, holdings: list[Holding]) -> RoomPlan:
    """Whether a session of `consumer` needing `need_bytes` can open, and whose idle sessions make room."""
    held = held_by_consumer(holdings)
    share = fair_share_bytes(budget_bytes, [*held, consumer])
    others = any(holder != consumer for holder in held)  # alone, it is entitled to the whole cache
    over_share = others and held.get(consumer, 0) + need_bytes > share
    if need_bytes <= free_bytes:
        return RoomPlan([], refused=False, share_bytes=share, over_share=over_share)
    if over_share:
        return RoomPlan([], refused=True, share_bytes=share, over_share=True)
    evict = _evictions(held, share, consumer, need_bytes - free_bytes, holdings)
    return RoomPlan(evict or [], refused=evict is None, share_bytes=share, over_share=False)


def _evictions(
    held: Mapping[str, int], share: int, consumer: str, missing_bytes: int, holdings: list[Holding]
) -> list[str] | None:
    """Idle sessions of institutions above `share`, longest idle first, that free `missing_bytes`; None if
    they cannot."""
    left = dict(held)
    idle = sorted((h for h in holdings if h.idle_since is not None and h.consumer != consumer), key=_idle_key)
    evict: list[str] = []
    for holding in idle:
        if missing_bytes <= 0:
            break
        if left[holding.consumer] <= share:
            continue
        evict.append(holding.session_id)
        left[holding.consumer] -= holding.cache_bytes
        missing_bytes -= holding.cache_bytes
    return evict if missing_bytes <= 0 else None


def _idle_key(holding: Holding) -> float:
    return holding.idle_since if holding.idle_since is not None else float("inf")
