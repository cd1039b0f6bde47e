"""A real two-peer DHT swarm for tests that attack or read it: the second peer joins through the first."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hivemind.dht.validation import RecordValidatorBase

from coop.swarm.directory import SwarmDirectory


@contextmanager
def two_peer_swarm(validator: RecordValidatorBase | None) -> Iterator[tuple[SwarmDirectory, SwarmDirectory]]:
    """Both peers run `validator`; they are shut down on leaving, the joiner first."""
    first = SwarmDirectory.start([], validator=validator)
    try:
        second = SwarmDirectory.start(first.visible_maddrs(), validator=validator)
        try:
            yield first, second
        finally:
            second.shutdown()
    finally:
        first.shutdown()
