"""Who pays for a session, decided once when the request's model is known, and carried by its chain.

A `Payer` replaces loose arguments threaded through every layer: the consuming institution, the API
key that admitted the request, the model its sessions run and the fair-share priority their steps
carry to the nodes. A `Charge` pairs it with the meter that writes down what each hop did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from coop.receipts import TokenTally
from coop.swarm.routing import Hop


@dataclass(frozen=True)
class Payer:
    institution: str = ""  # the institution charged; "" = the process's own (development, local runs)
    api_key_id: str = ""  # of the API key that admitted the request; "" = none
    model_hash: str = ""  # the model the sessions run; "" = the coordinator's default
    priority: float = 0.0  # fair-share factor F in [0, 1]: nodes run queued steps highest first


class Meter(Protocol):
    """Where a remote chain reports what it sent each hop (the coordinator's ledger metering)."""

    def stepped(self, session_id: str, consumer: Payer, hops: Sequence[Hop], tokens: int, sent: TokenTally) -> None:
        """One step of `tokens` tokens went through every hop; `sent` is the session's total so far."""
        ...

    def session_ended(self, session_id: str, consumer: Payer, hops: Sequence[Hop], sent: TokenTally) -> None:
        """The session on these hops is over (closed, or abandoned by a failover); `sent` is its total."""
        ...


@dataclass(frozen=True)
class Charge:
    consumer: Payer = field(default_factory=Payer)  # who pays
    meter: Meter | None = None  # None: nothing is metered (no ledger)

    @property
    def priority(self) -> float:
        return self.consumer.priority


UNMETERED = Charge()
