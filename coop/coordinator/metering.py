"""What the coordinator saw each node do, for the ledger (observations) and fair share (live usage).

Every step a chain sends is counted against each hop of its route; when a route's session ends
(normally or by failover) its counts become `Observation` rows, the ceiling for what the nodes'
receipts may claim. They are buffered here and written at once by a background task (and by the
receipt collector before it books), so requests never wait on the database. Fair share is fed at
once, step by step, so priorities follow usage as it happens rather than when receipts arrive.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coop.ledger.fairshare import FairShare
from coop.ledger.models import Observation
from coop.receipts import TokenTally
from coop.swarm.routing import Hop


class Metering:
    def __init__(self, fair_share: FairShare, span_flops_per_token: Callable[[int, int], int]) -> None:
        self.fair_share = fair_share
        self._flops = span_flops_per_token
        self._observations: list[Observation] = []
        self._lock = threading.Lock()
        self.tokens_served = 0  # every token of every step, for the admin view's tokens/s
        self.observed = asyncio.Event()  # set when rows wait to be written; used on the event loop only

    def stepped(self, consumer: str, hops: Sequence[Hop], tokens: int) -> None:
        now = time.time()
        self.tokens_served += tokens
        for hop in hops:
            self.fair_share.record(hop.institution or None, consumer, tokens * self._flops(hop.start, hop.end), now)

    def for_key(self, api_key_id: str) -> KeyedMeter:
        """The meter of one request, admitted by this API key ("" = none)."""
        return KeyedMeter(self, api_key_id)

    def session_ended(
        self, session_id: str, consumer: str, hops: Sequence[Hop], sent: TokenTally, api_key_id: str = ""
    ) -> None:
        if sent.total == 0:
            return
        rows = [
            Observation(
                session_id=session_id,
                node_id=hop.node_id,
                provider=hop.institution,
                consumer=consumer,
                start_block=hop.start,
                end_block=hop.end,
                prefill_tokens=sent.prefill,
                decode_tokens=sent.decode,
                api_key_id=api_key_id,
            )
            for hop in hops
        ]
        with self._lock:
            self._observations.extend(rows)
        self.observed.set()

    def drain(self) -> list[Observation]:
        self.observed.clear()
        with self._lock:
            rows, self._observations = self._observations, []
        return rows

    def put_back(self, rows: Sequence[Observation]) -> None:
        """Rows whose write failed: written with the next batch."""
        with self._lock:
            self._observations[:0] = rows


@dataclass(frozen=True)
class KeyedMeter:
    """A `coop.pipeline.charge.Meter` for one request: its sessions' observations name the API key that
    admitted it, which the countersignature of every receipt then covers."""

    metering: Metering
    api_key_id: str

    def stepped(self, consumer: str, hops: Sequence[Hop], tokens: int) -> None:
        self.metering.stepped(consumer, hops, tokens)

    def session_ended(self, session_id: str, consumer: str, hops: Sequence[Hop], sent: TokenTally) -> None:
        self.metering.session_ended(session_id, consumer, hops, sent, self.api_key_id)
