"""The client part's head for every session at once: the steps that come back together are sampled in one call.

After each step a session needs the final norm, the LM head and a token. On the demo model the LM
head is a 49152 x 576 float32 matrix, and reading it is most of what a head costs on CPU: one call over
the rows of several sessions reads it once (packed for oneDNN, `coop.model.packed_linear`: ~3 ms for
one row, ~4.5 ms for 8). With batched node steps,
the steps of concurrent sessions come back from the last node together, so their heads meet here.

The heads run in one worker thread per client part, beside the event loop. The rows that arrive while
a batch computes wait and form the next batch, so a session alone never waits for others, and nothing
waits on a timer. Each row keeps its session's sampling parameters and generator.

Exactness: a packed matmul sums in another order than a one-row one (float32: logits move by ~2e-5),
so a greedy row whose top two logits are closer than `_tie_tolerance` is computed again alone, as an
unbatched run computes it, and greedy tokens equal those of a single-process run. Sampled rows keep the
packed logits: the same seed gives the same tokens when the session runs alone, and may differ at a
probability boundary under concurrent load. A CPU head that could not be packed (not float32) repacks
its matrix on each call, so 2 or 3 rows cost more than as many one-row calls: there, fewer than
`MIN_PACKED_ROWS_DENSE_CPU` rows run one by one.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from coop.model.client_part import ClientPart
from coop.model.packed_linear import PackedLinear
from coop.pipeline.sampling import SamplingParams, sample_token

MAX_ROWS = 64  # sessions whose heads run in one call; more wait for the next one
MIN_PACKED_ROWS_DENSE_CPU = 4  # measured on the demo model's head: 2-3 rows cost more than one by one


@dataclass
class HeadRequest:
    hidden: torch.Tensor  # [1, n, hidden] after the last block: n = 1 + len(drafts), or the prompt
    drafts: Sequence[int]
    params: SamplingParams
    generator: torch.Generator | None
    done: Future[list[int]] = field(default_factory=Future)

    @property
    def positions(self) -> int:
        """Positions whose logits the step needs: every one when it carried drafts, else the last."""
        return self.hidden.shape[1] if self.drafts else 1


class HeadBatcher:
    """Collects the heads of the sessions of one client part and runs each batch in one worker thread."""

    def __init__(self, client: ClientPart, *, max_rows: int = MAX_ROWS) -> None:
        self._client = weakref.ref(client)  # the batcher lives in a cache keyed weakly by its client
        self.max_rows = max_rows
        dense_cpu = client.device.type == "cpu" and not isinstance(client.model.get_output_embeddings(), PackedLinear)
        self.min_packed_rows = MIN_PACKED_ROWS_DENSE_CPU if dense_cpu else 2
        self.batches_run = 0
        self.rows_packed = 0  # rows that ran in a packed call
        self.rows_recomputed = 0  # greedy rows computed again alone at a near-tie
        self._waiting: list[HeadRequest] = []
        self._lock = threading.Lock()
        self._running = False
        self._thread: threading.Thread | None = None  # runs batches while anybody waits, then ends

    async def kept_tokens(
        self, hidden: torch.Tensor, drafts: Sequence[int], params: SamplingParams, generator: torch.Generator | None
    ) -> list[int]:
        """What `coop.pipeline.generation` keeps of a step: the sampled next token; or, after drafts
        (greedy only), the drafts the argmax agrees with, then the argmax after the last of them."""
        request = HeadRequest(hidden, drafts, params, generator)
        with self._lock:
            self._waiting.append(request)
            start, self._running = not self._running, True
        if start:
            self._thread = threading.Thread(target=self._drain, name="coop-head", daemon=True)
            self._thread.start()
        return await asyncio.wrap_future(request.done)

    def wait_idle(self, timeout_s: float) -> None:
        """Return once the thread that ran the last batches has ended (or after `timeout_s`): for an owner
        that leaves no thread behind when it closes (`coop.client.RemoteModel.close`)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _drain(self) -> None:
        """Run batches until nobody waits."""
        while True:
            with self._lock:
                taken, self._waiting = self._waiting[: self.max_rows], self._waiting[self.max_rows :]
                if not taken:
                    self._running = False
                    return
            batch = [r for r in taken if r.done.set_running_or_notify_cancel()]  # callers that gave up are dropped
            client = self._client()
            if not batch or client is None:
                continue
            try:
                results = self.run_batch(client, batch)
            except Exception as exc:  # the batch as a whole failed: each of its sessions reports it
                for request in batch:
                    request.done.set_exception(exc)
                continue
            for request, kept in zip(batch, results, strict=True):
                request.done.set_result(kept)

    def run_batch(self, client: ClientPart, batch: Sequence[HeadRequest]) -> list[list[int]]:
        """The kept tokens of each request, in order: packed in one head call from `min_packed_rows` rows on."""
        self.batches_run += 1
        if len(batch) < self.min_packed_rows:
            return [_kept(r, _alone(client, r)) for r in batch]
        self.rows_packed += len(batch)
        logits = _packed(client, batch).split([r.positions for r in batch])
        results = []
        for request, rows in zip(batch, logits, strict=True):
            if request.params.greedy and _near_tie(rows, client):
                self.rows_recomputed += 1
                rows = _alone(client, request)
            results.append(_kept(request, rows))
        return results


def _alone(client: ClientPart, request: HeadRequest) -> torch.Tensor:
    """[positions, vocab]: the logits as an unbatched run computes them."""
    return client.logits(request.hidden, last_only=not request.drafts)[0]


def _packed(client: ClientPart, batch: Sequence[HeadRequest]) -> torch.Tensor:
    """[sum of positions, vocab]: the rows of every request, from one head call over their packed states."""
    keep: list[int] = []
    offset = 0
    for request in batch:
        n = request.hidden.shape[1]
        keep.extend(range(offset + n - request.positions, offset + n))
        offset += n
    packed = torch.cat([request.hidden for request in batch], dim=1)  # [1, total, hidden]
    return client.logits_at(packed, keep)


def _near_tie(rows: torch.Tensor, client: ClientPart) -> bool:
    """Whether a row's top two logits are close enough for packing's reordered sums to swap them."""
    top2 = torch.topk(rows, 2, dim=-1).values  # [positions, 2]
    return bool(((top2[:, 0] - top2[:, 1]) <= _tie_tolerance(top2[:, 0], client)).any())


def _tie_tolerance(top: torch.Tensor, client: ClientPart) -> torch.Tensor:
    """A bound on how far packing moves a logit: float32 sums over hidden_size terms in another order,
    then rounding to the model's dtype (~1.4e-3 at a logit of 20 in float32; measured ~2e-5)."""
    summing = client.manifest.hidden_size * torch.finfo(torch.float32).eps
    rounding = 2 * torch.finfo(client.dtype).eps
    return top.abs().clamp(min=1.0) * (summing + rounding)


def _kept(request: HeadRequest, rows: torch.Tensor) -> list[int]:
    """rows: [positions, vocab] float32 logits of one step."""
    if not request.drafts:
        return [sample_token(rows[-1], request.params, request.generator)]
    predicted = rows.argmax(dim=-1).tolist()  # [1 + len(drafts)]
    kept: list[int] = []
    for draft, guess in zip(request.drafts, predicted, strict=False):
        if draft != guess:
            break
        kept.append(draft)
    kept.append(predicted[len(kept)])
    return kept


_BATCHERS: weakref.WeakKeyDictionary[ClientPart, HeadBatcher] = weakref.WeakKeyDictionary()
_BATCHERS_LOCK = threading.Lock()


def head_batcher(client: ClientPart) -> HeadBatcher:
    """The one batcher of a client part, shared by every session (and event loop) that uses it."""
    with _BATCHERS_LOCK:
        batcher = _BATCHERS.get(client)
        if batcher is None:
            batcher = _BATCHERS[client] = HeadBatcher(client)
        return batcher
