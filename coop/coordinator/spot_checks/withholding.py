"""The meter of a checked session: what nodes found at fault did is not observed, so it is not paid."""

from __future__ import annotations

from collections.abc import Sequence

from coop.pipeline.charge import Meter, Payer
from coop.receipts import TokenTally
from coop.swarm.node_key import NodeKey, key_of
from coop.swarm.routing import Hop


class WithholdingMeter:
    """A meter that writes no observation for the nodes a check found at fault: their receipts go unpaid."""

    def __init__(self, meter: Meter | None) -> None:
        self.meter = meter
        self.withheld: set[NodeKey] = set()

    def stepped(self, session_id: str, consumer: Payer, hops: Sequence[Hop], tokens: int, sent: TokenTally) -> None:
        """Checkpoints go on for the others; a culprit keeps only what was observed before it was caught,
        steps that had all passed their checks."""
        if self.meter is not None:
            kept = [h for h in hops if key_of(h) not in self.withheld]
            self.meter.stepped(session_id, consumer, kept, tokens, sent)

    def session_ended(self, session_id: str, consumer: Payer, hops: Sequence[Hop], sent: TokenTally) -> None:
        if self.meter is not None:
            self.meter.session_ended(session_id, consumer, [h for h in hops if key_of(h) not in self.withheld], sent)
