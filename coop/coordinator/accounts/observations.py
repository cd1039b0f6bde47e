"""What the coordinator saw each node do, for the ledger (observations) and fair share (live usage).

Every step a chain sends is counted against each hop of its route. The counts become `Observation`
rows, the ceiling for what the nodes' receipts may claim, at three moments: the session's first
step (the session is on record, so a coordinator crash cannot leave its receipts unknown), every
`checkpoint_tokens` tokens or `checkpoint_s` seconds after that (a crash then loses at most that
much of the ceiling, mirroring the nodes' receipt batches), and its end (normal or by failover).
Rows are buffered here, one per (session, node) — a node being its (institution, node id), as two
institutions' "gpu-0" may serve one session — and written at once by a background task (and by
the receipt collector before it books), so requests never wait on the database.

A session stays *live* (`live`) from its first step until its final row is written: while it is, a
receipt that claims more than the written ceiling waits for the next write instead of being capped.
After a restart no session is live, and the last rows written are the ceiling.

Fair share is fed at once, step by step, so priorities follow usage as it happens rather than when
receipts arrive, at the FLOPs per token of the model the session runs (its `Payer`'s; a coordinator
may serve several models, one ledger and one fair share for all). Observations name that model and
the API key that admitted the request, which the countersignature of every receipt then covers, so a
receipt can only be paid at its session's model's FLOPs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from coop.ledger.fairshare import FairShare
from coop.ledger.models import Observation
from coop.pipeline.charge import Payer
from coop.receipts import TokenTally
from coop.swarm.node_key import NodeKey
from coop.swarm.routing import Hop

CHECKPOINT_TOKENS = 64  # as the nodes' default receipt batch (`receipt_batch_tokens`)
CHECKPOINT_S = 30.0


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
        model_rates: Mapping[str, Callable[[int, int], int]] | None = None,
        checkpoint_tokens: int = CHECKPOINT_TOKENS,
        checkpoint_s: float = CHECKPOINT_S,
    ) -> None:
        """`span_flops_per_token`: the default model's, for blocks [start, end); `model_rates`: by model
        hash, every model's (a payer's model not in it is priced as the default)."""
        self.fair_share = fair_share
        self._flops = span_flops_per_token
        self._rates = dict(model_rates or {})
        self.checkpoint_tokens = checkpoint_tokens
        self.checkpoint_s = checkpoint_s
        self._checkpoints: dict[str, _Checkpoint] = {}  # running sessions; on the event loop only
        self._unsettled: set[str] = set()  # sessions whose final row is not written yet
        self._rows: dict[tuple[str, NodeKey], Observation] = {}  # (session, node) -> its newest row, unwritten
        self._ended: set[str] = set()  # sessions whose final row is in _rows
        self._lock = threading.Lock()
        self.tokens_served = 0  # every token of every step, for the admin view's tokens/s
        self.observed = asyncio.Event()  # set when rows wait to be written; used on the event loop only

    def stepped(self, session_id: str, consumer: Payer, hops: Sequence[Hop], tokens: int, sent: TokenTally) -> None:
        now = time.time()
        self.tokens_served += tokens
        flops = self._rates.get(consumer.model_hash, self._flops)
        for hop in hops:
            record = self.fair_share.record
            record(hop.institution or None, consumer.institution, tokens * flops(hop.start, hop.end), now)
        last = self._checkpoints.get(session_id)
        clock = time.monotonic()
        if last is None or sent.total - last.tokens >= self.checkpoint_tokens or clock - last.at >= self.checkpoint_s:
            self._checkpoints[session_id] = _Checkpoint(sent.total, clock)
            with self._lock:
                self._unsettled.add(session_id)
            self._buffer(session_id, consumer, hops, sent, ended=False)

    def session_ended(self, session_id: str, consumer: Payer, hops: Sequence[Hop], sent: TokenTally) -> None:
        self._checkpoints.pop(session_id, None)
        if sent.total == 0:
            with self._lock:
                self._unsettled.discard(session_id)
            return
        self._buffer(session_id, consumer, hops, sent, ended=True)

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

    def _buffer(self, session_id: str, consumer: Payer, hops: Sequence[Hop], sent: TokenTally, *, ended: bool) -> None:
        with self._lock:
            for hop in hops:
                self._keep(
                    Observation(
                        session_id=session_id,
                        node_id=hop.node_id,
                        provider=hop.institution,
                        consumer=consumer.institution,
                        start_block=hop.start,
                        end_block=hop.end,
                        prefill_tokens=sent.prefill,
                        decode_tokens=sent.decode,
                        api_key_id=consumer.api_key_id,
                        model_hash=consumer.model_hash,
                    )
                )
            if ended:
                self._ended.add(session_id)
        self.observed.set()

    def _keep(self, row: Observation) -> None:
        """Buffer a row, unless one with more tokens is buffered for its (session, node) (under the lock)."""
        key = (row.session_id, row.node)
        held = self._rows.get(key)
        if held is None or (row.prefill_tokens, row.decode_tokens) >= (held.prefill_tokens, held.decode_tokens):
            self._rows[key] = row
