"""Who pays for a session, decided once at admission and carried by the chain that runs it.

A `Charge` replaces loose arguments threaded through every layer: the consuming institution, the
fair-share priority its steps carry to the nodes, and the meter that writes down what each hop did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from coop.receipts import TokenTally
from coop.swarm.routing import Hop


class Meter(Protocol):
    """Where a remote chain reports what it sent each hop (the coordinator's ledger metering)."""

    def stepped(self, session_id: str, consumer: str, hops: Sequence[Hop], tokens: int, sent: TokenTally) -> None:
        """One step of `tokens` tokens went through every hop; `sent` is the session's total so far."""
        ...

    def session_ended(self, session_id: str, consumer: str, hops: Sequence[Hop], sent: TokenTally) -> None:
        """The session on these hops is over (closed, or abandoned by a failover); `sent` is its total."""
        ...


@dataclass(frozen=True)
class Charge:
    consumer: str = ""  # the institution charged; "" = the process's own (development, local runs)
    priority: float = 0.0  # fair-share factor F in [0, 1]: nodes run queued steps highest first
    meter: Meter | None = None  # None: nothing is metered (no ledger)


UNMETERED = Charge()
