"""What the coordinator saw each node do, for the ledger (observations) and fair share (live usage).

Every step a chain sends is counted against each hop of its route. The counts become `Observation`
rows, the ceiling for what the nodes' receipts may claim, at three moments: the session's first
step (the session is on record, so a coordinator crash cannot leave its receipts unknown), every
`checkpoint_tokens` tokens or `checkpoint_s` seconds after that (a crash then loses at most that
much of the ceiling, mirroring the nodes' receipt batches), and its end (normal or by failover).
Rows are buffered here, one per (session, node), and written at once by a background task (and by
the receipt collector before it books), so requests never wait on the database.

A session stays *live* (`live`) from its first step until its final row is written: while it is, a
receipt that claims more than the written ceiling waits for the next write instead of being capped.
After a restart no session is live, and the last rows written are the ceiling.

Fair share is fed at once, step by step, so priorities follow usage as it happens rather than when
receipts arrive, at the FLOPs per token of the model the session runs (`KeyedMeter.for_model`; a
coordinator may serve several models, one ledger and one fair share for all). Observations name that
model, so a receipt can only be paid at its session's model's FLOPs.
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

CHECKPOINT_TOKENS = 64  # as the nodes' default receipt batch (`receipt_batch_tokens`)
CHECKPOINT_S = 30.0


@dataclass(frozen=True)
class ModelRate:
    """The model a session runs: named in its observations, and priced at its FLOPs per token."""

    model_hash: str
    span_flops_per_token: Callable[[int, int], int]  # for blocks [start, end)


@dataclass
class _Checkpoint:
    tokens: int  # the session's tokens sent when it was last written
    at: float  # time.monotonic() then


class Metering:
    def __init__(
        self,
        fair_share: FairShare,
        span_flops_per_token: Callable[[int, int], int],
        *,
        checkpoint_tokens: int = CHECKPOINT_TOKENS,
        checkpoint_s: float = CHECKPOINT_S,
    ) -> None:
        self.fair_share = fair_share
        self._flops = span_flops_per_token
        self.checkpoint_tokens = checkpoint_tokens
        self.checkpoint_s = checkpoint_s
        self._checkpoints: dict[str, _Checkpoint] = {}  # running sessions; on the event loop only
        self._unsettled: set[str] = set()  # sessions whose final row is not written yet
        self._rows: dict[tuple[str, str], Observation] = {}  # (session, node) -> its newest row, unwritten
        self._ended: set[str] = set()  # sessions whose final row is in _rows
        self._lock = threading.Lock()
        self.tokens_served = 0  # every token of every step, for the admin view's tokens/s
        self.observed = asyncio.Event()  # set when rows wait to be written; used on the event loop only

    def stepped(
        self,
        session_id: str,
        consumer: str,
        hops: Sequence[Hop],
        tokens: int,
        sent: TokenTally,
        api_key_id: str = "",
        model: ModelRate | None = None,
    ) -> None:
        """`model`: the session's (None: unnamed, at the default model's FLOPs)."""
        now = time.time()
        self.tokens_served += tokens
        flops = model.span_flops_per_token if model is not None else self._flops
        for hop in hops:
            self.fair_share.record(hop.institution or None, consumer, tokens * flops(hop.start, hop.end), now)
        last = self._checkpoints.get(session_id)
        clock = time.monotonic()
        if last is None or sent.total - last.tokens >= self.checkpoint_tokens or clock - last.at >= self.checkpoint_s:
            self._checkpoints[session_id] = _Checkpoint(sent.total, clock)
            with self._lock:
                self._unsettled.add(session_id)
            self._buffer(session_id, consumer, hops, sent, api_key_id, model, ended=False)

    def for_key(self, api_key_id: str) -> KeyedMeter:
        """The meter of one request, admitted by this API key ("" = none)."""
        return KeyedMeter(self, api_key_id)

    def session_ended(
        self,
        session_id: str,
        consumer: str,
        hops: Sequence[Hop],
        sent: TokenTally,
        api_key_id: str = "",
        model: ModelRate | None = None,
    ) -> None:
        self._checkpoints.pop(session_id, None)
        if sent.total == 0:
            with self._lock:
                self._unsettled.discard(session_id)
            return
        self._buffer(session_id, consumer, hops, sent, api_key_id, model, ended=True)

    def live(self, session_id: str) -> bool:
        """Whether the session's observation may still rise (called from booking threads)."""
        with self._lock:
            return session_id in self._unsettled

    def flush(self, write: Callable[[Sequence[Observation]], None]) -> None:
        """Write the buffered rows with `write`; on failure they wait for the next flush."""
        self.observed.clear()
        with self._lock:
            rows, self._rows = self._rows, {}
            ended, self._ended = self._ended, set()
        try:
            write(list(rows.values()))
        except BaseException:
            with self._lock:
                for row in rows.values():
                    self._keep(row)
                self._ended |= ended
            raise
        with self._lock:
            self._unsettled -= ended

    def _buffer(
        self,
        session_id: str,
        consumer: str,
        hops: Sequence[Hop],
        sent: TokenTally,
        api_key_id: str,
        model: ModelRate | None,
        *,
        ended: bool,
    ) -> None:
        with self._lock:
            for hop in hops:
                self._keep(
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
                        model_hash=model.model_hash if model is not None else "",
                    )
                )
            if ended:
                self._ended.add(session_id)
        self.observed.set()

    def _keep(self, row: Observation) -> None:
        """Buffer a row, unless one with more tokens is buffered for its (session, node) (under the lock)."""
        key = (row.session_id, row.node_id)
        held = self._rows.get(key)
        if held is None or (row.prefill_tokens, row.decode_tokens) >= (held.prefill_tokens, held.decode_tokens):
            self._rows[key] = row


@dataclass(frozen=True)
class KeyedMeter:
    """A `coop.pipeline.charge.Meter` for one request: its sessions' observations name the API key that
    admitted it, which the countersignature of every receipt then covers."""

    metering: Metering
    api_key_id: str
    model: ModelRate | None = None  # the session's; None: unnamed, at the default model's FLOPs

    def for_model(self, model: ModelRate) -> KeyedMeter:
        """This meter for a session of `model` (admission, which makes the meter, precedes the model)."""
        return KeyedMeter(self.metering, self.api_key_id, model)

    def stepped(self, session_id: str, consumer: str, hops: Sequence[Hop], tokens: int, sent: TokenTally) -> None:
        self.metering.stepped(session_id, consumer, hops, tokens, sent, self.api_key_id, self.model)

    def session_ended(self, session_id: str, consumer: str, hops: Sequence[Hop], sent: TokenTally) -> None:
        self.metering.session_ended(session_id, consumer, hops, sent, self.api_key_id, self.model)
