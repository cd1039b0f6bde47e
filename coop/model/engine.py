"""The block engine: runs blocks [start, end) of a prepared model for many sessions at once.

Each session owns a KV cache for the hosted blocks only. The cache is a transformers
`DynamicCache` laid out for the whole model, in which blocks outside the span are `DummyLayer`s:
the model's own mask helpers then size their masks from the first *hosted* block, so a span does
not need to start at block 0.

Sessions reserve their worst-case cache size (max_length tokens, at most the model's context)
when they open, against a budget for the whole engine; an open that does not fit is refused up
front rather than failing mid-generation.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DummyLayer

from coop.errors import (
    CacheBudgetExceeded,
    ContextLengthExceeded,
    CoopError,
    InvalidInput,
    InvalidPositions,
    InvalidTensor,
    SessionExists,
    SessionLimitExceeded,
    SpanOutOfRange,
    UnknownSession,
)
from coop.model.loading import check_span, load_span, resolve_device
from coop.model.manifest import Manifest
from coop.model.packed_linear import packed_bytes
from coop.model.packing import PackedCaches, full_attention_only, packed_attention_mask, packed_positions
from coop.model.skeleton import PassThrough, decoder_layers
from coop.model.weight_layout import DEFAULT_BATCH_ROWS, LayoutChoice, apply_weight_layout, layout_of

_PASS_THROUGH = PassThrough()

DEFAULT_CACHE_BUDGET_BYTES = 2 << 30
DEFAULT_IDLE_TIMEOUT_S = 300.0
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class StepInput:
    """One session's step in a batch: hidden states [1, n, hidden] of its tokens at start_position.. (+n).

    `rewind`: drop the cached tokens from start_position on first (the rejected drafts of a multi-token step).
    """

    session_id: str
    hidden: torch.Tensor
    start_position: int
    rewind: bool = False


@dataclass
class _Session:
    session_id: str
    cache: DynamicCache
    max_length: int
    reserved_bytes: int
    start: int  # the blocks [start, end) this session runs: all of the engine's span, or a part of it
    end: int
    length: int = 0  # tokens processed so far = the position the next step must start at
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class SpanEngine:
    """Blocks [start, end) of one model on one device, with per-session KV caches."""

    def __init__(
        self,
        manifest: Manifest,
        span_model: PreTrainedModel,
        start: int,
        end: int,
        device: torch.device,
        *,
        cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        weight_layout: LayoutChoice | None = None,
    ) -> None:
        """`weight_layout`: how the span's CPU weight layout was chosen (default: as `span_model` is)."""
        self.manifest = manifest
        self.weight_layout = weight_layout or LayoutChoice(layout_of(span_model), "fixed")
        self.start, self.end = start, end
        self.device = device
        self.dtype: torch.dtype = getattr(torch, manifest.dtype)
        self.hidden_size = manifest.hidden_size
        self.cache_budget_bytes = cache_budget_bytes
        self.idle_timeout_s = idle_timeout_s
        self._model = span_model
        self._config = span_model.config
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._compute_lock = threading.Lock()
        self.bytes_per_token_per_block = self._cache_bytes_per_token()
        self.context_length = manifest.context_length
        self._layers = decoder_layers(span_model, manifest.num_blocks)
        self._hosted_layers = {i: self._layers[i] for i in range(start, end)}
        # Packed batches hand the model a ready 4D mask, in the format of its attention function.
        self.can_batch = full_attention_only(self._config) and self._config._attn_implementation in ("sdpa", "eager")
        # A sliding-window layer forgets what falls out of its window, so its cache cannot be cut back.
        self.can_rewind = full_attention_only(self._config)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        start: int,
        end: int,
        *,
        device: str | torch.device | None = None,
        cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        weight_layout: str = "auto",
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ) -> SpanEngine:
        """`weight_layout`: auto (timed for 1 and `batch_rows` rows), stock or packed (coop/model/weight_layout.py)."""
        model_dir = Path(model_dir)
        manifest = Manifest.load(model_dir)
        check_span(manifest, start, end)
        dev = resolve_device(device)
        span_model = load_span(model_dir, manifest, start, end, dev)
        choice = apply_weight_layout(span_model, weight_layout, batch_rows=batch_rows, what=f"blocks {start}:{end}")
        return cls(
            manifest,
            span_model,
            start,
            end,
            dev,
            cache_budget_bytes=cache_budget_bytes,
            idle_timeout_s=idle_timeout_s,
            weight_layout=choice,
        )

    # -- accounting -------------------------------------------------------------------------

    def _cache_bytes_per_token(self) -> int:
        """KV-cache bytes one token costs in each hosted block (keys + values)."""
        text = self._config.get_text_config()
        heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * heads * head_dim * itemsize

    @property
    def reserved_bytes(self) -> int:
        with self._sessions_lock:
            return sum(s.reserved_bytes for s in self._sessions.values())

    @property
    def free_cache_bytes(self) -> int:
        return max(0, self.cache_budget_bytes - self.reserved_bytes)

    @property
    def used_cache_bytes(self) -> int:
        """KV-cache bytes the open sessions' tokens fill (at most what they reserved)."""
        with self._sessions_lock:
            return sum(s.length * self.bytes_per_token_per_block * (s.end - s.start) for s in self._sessions.values())

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def cache_bytes(self, session_id: str) -> int:
        """Bytes the session's KV cache holds right now (not its reservation)."""
        session = self._get(session_id)
        total = 0
        for layer in session.cache.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._model.parameters()) + packed_bytes(self._model)

    # -- sessions ---------------------------------------------------------------------------

    @property
    def bytes_per_token(self) -> int:
        """KV-cache bytes per token of a session over the whole span."""
        return self.bytes_per_token_per_block * (self.end - self.start)

    def reservation_bytes(self, max_length: int, start: int, end: int) -> int:
        """The KV cache a session of max_length tokens over blocks [start, end) reserves."""
        return max_length * self.bytes_per_token_per_block * (end - start)

    def open_session(
        self,
        session_id: str | None = None,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        start: int | None = None,
        end: int | None = None,
    ) -> str:
        """Open a session over blocks [start, end) of this engine's span (default: all of it)."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise SpanOutOfRange(f"blocks {start}:{end} are not within this engine's span {self.start}:{self.end}")
        self.check_max_length(max_length)
        session_id = session_id or uuid.uuid4().hex
        self.evict_idle()
        needed = self.reservation_bytes(max_length, start, end)
        with self._sessions_lock:
            if session_id in self._sessions:
                raise SessionExists(f"session {session_id} is already open on blocks {self.start}:{self.end}")
            free = self.cache_budget_bytes - sum(s.reserved_bytes for s in self._sessions.values())
            if needed > free:
                raise CacheBudgetExceeded(needed, max(free, 0), self.cache_budget_bytes)
            self._sessions[session_id] = _Session(
                session_id, self._new_cache(start, end), max_length, needed, start, end
            )
        return session_id

    def check_max_length(self, max_length: int) -> None:
        if max_length <= 0:
            raise SessionLimitExceeded(f"max_length must be positive, got {max_length}")
        if max_length > self.context_length:
            raise ContextLengthExceeded(
                f"max_length {max_length:,} is beyond this model's context of {self.context_length:,} tokens; "
                f"open sessions of at most {self.context_length:,}"
            )

    def close_session(self, session_id: str) -> None:
        with self._sessions_lock:
            if self._sessions.pop(session_id, None) is None:
                raise UnknownSession(f"no session {session_id} on blocks {self.start}:{self.end}")

    def evict(self, session_id: str) -> None:
        """Free a session if it is still open (its stream ended); no error if it is already gone."""
        with self._sessions_lock:
            self._sessions.pop(session_id, None)

    def evict_idle(self, now: float | None = None) -> list[str]:
        """Free sessions unused for idle_timeout_s; returns their ids."""
        now = time.monotonic() if now is None else now
        with self._sessions_lock:
            idle = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_timeout_s]
            for sid in idle:
                del self._sessions[sid]
        return idle

    def is_open(self, session_id: str) -> bool:
        return session_id in self._sessions

    def session_length(self, session_id: str) -> int:
        return self._get(session_id).length

    def _get(self, session_id: str) -> _Session:
        with self._sessions_lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(
                f"no session {session_id} on blocks {self.start}:{self.end} (closed, expired after "
                f"{self.idle_timeout_s:.0f}s idle, or never opened)"
            )
        return session

    def _new_cache(self, start: int, end: int) -> DynamicCache:
        cache = DynamicCache(config=self._config)
        for index in range(len(cache.layers)):
            if not start <= index < end:
                cache.layers[index] = DummyLayer()
        return cache

    # -- compute ----------------------------------------------------------------------------

    def step(self, session_id: str, hidden: torch.Tensor, start_position: int, *, rewind: bool = False) -> torch.Tensor:
        """Run the span on hidden states [1, n, hidden] of the tokens at start_position.. (+n).

        Returns the span's output hidden states with the same shape, on the engine's device. With
        `rewind`, the session's cached tokens from start_position on are dropped first.
        """
        session = self._get(session_id)
        self._validate_hidden(hidden)
        n = hidden.shape[1]
        with session.lock:
            if rewind:
                self._rewind(session, start_position)
            self._check_positions(session, start_position, n)
            positions = torch.arange(start_position, start_position + n, device=self.device).unsqueeze(0)
            with self._compute_lock, torch.inference_mode(), self._only_blocks(session.start, session.end):
                output = self._model(
                    inputs_embeds=hidden.to(self.device),
                    position_ids=positions,
                    past_key_values=session.cache,
                    use_cache=True,
                ).last_hidden_state
            session.length += n
            session.last_used = time.monotonic()
        return output

    def step_batch(self, steps: Sequence[StepInput]) -> list[torch.Tensor | CoopError]:
        """Run the steps of several sessions as one forward pass per span; one result per step, in order.

        The tokens of all steps are packed into one sequence (`coop.model.packing`); the model's own
        attention function runs unchanged. A step that fails its checks gets its error and leaves the
        others alone.
        """
        if len(steps) == 1 or not self.can_batch:
            return [self._step_or_error(s) for s in steps]
        results: list[torch.Tensor | CoopError | None] = [None] * len(steps)
        sessions: dict[int, _Session] = {}
        seen: set[str] = set()
        for index, s in enumerate(steps):
            try:
                if s.session_id in seen:
                    raise InvalidInput(f"session {s.session_id} has two steps in one batch")
                seen.add(s.session_id)
                session = self._get(s.session_id)
                self._validate_hidden(s.hidden)
                sessions[index] = session
            except CoopError as exc:
                results[index] = exc
        with ExitStack() as locks:
            for index in sorted(sessions, key=lambda i: steps[i].session_id):
                locks.enter_context(sessions[index].lock)
            groups: dict[tuple[int, int], list[int]] = {}
            for index, session in sessions.items():
                try:
                    if steps[index].rewind:
                        self._rewind(session, steps[index].start_position)
                    self._check_positions(session, steps[index].start_position, steps[index].hidden.shape[1])
                except CoopError as exc:
                    results[index] = exc
                    continue
                groups.setdefault((session.start, session.end), []).append(index)
            for span, indices in groups.items():
                outputs = self._forward_packed(span, [sessions[i] for i in indices], [steps[i] for i in indices])
                for index, output in zip(indices, outputs, strict=True):
                    results[index] = output
        return [r if r is not None else InvalidInput("step was not run") for r in results]

    def _step_or_error(self, s: StepInput) -> torch.Tensor | CoopError:
        try:
            return self.step(s.session_id, s.hidden, s.start_position, rewind=s.rewind)
        except CoopError as exc:
            return exc

    def _forward_packed(
        self, span: tuple[int, int], sessions: list[_Session], steps: list[StepInput]
    ) -> list[torch.Tensor | CoopError]:
        """One forward pass over blocks span for steps whose sessions' locks the caller holds."""
        counts = [s.hidden.shape[1] for s in steps]
        mask = packed_attention_mask(
            counts,
            [session.length for session in sessions],
            attn_implementation=self._config._attn_implementation,
            dtype=self.dtype,
            device=self.device,
        )
        positions = packed_positions([s.start_position for s in steps], counts, self.device)
        hidden = torch.cat([s.hidden.to(self.device) for s in steps], dim=1)  # [1, total_q, hidden]
        caches = PackedCaches([session.cache for session in sessions], counts)
        with self._compute_lock, torch.inference_mode(), self._only_blocks(*span):
            output = self._model(
                inputs_embeds=hidden,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=caches,
                use_cache=True,
            ).last_hidden_state
        now = time.monotonic()
        for session, n in zip(sessions, counts, strict=True):
            session.length += n  # the cache holds these tokens now, whatever became of them
            session.last_used = now
        results: list[torch.Tensor | CoopError] = list(output.split(counts, dim=1))
        for index, layer_idx in caches.quarantined.items():
            results[index] = InvalidTensor(
                f"session {sessions[index].session_id}'s states overflowed to NaN or Inf in block {layer_idx}; "
                "its cache is unusable: open a new session"
            )
        return results

    def _rewind(self, session: _Session, length: int) -> None:
        """Cut the session's cache back to its first `length` tokens; the caller holds its lock."""
        if not self.can_rewind:
            raise InvalidPositions(
                f"blocks {self.start}:{self.end} have sliding-window attention, whose cache cannot be rewound: "
                "turn multi-token steps off for this model"
            )
        if not 0 <= length <= session.length:
            raise InvalidPositions(
                f"cannot rewind session {session.session_id} to position {length}: it has processed "
                f"{session.length} tokens"
            )
        if length < session.length:
            session.cache.crop(length - session.length)  # a negative count: the tokens to drop
            session.length = length

    def _check_positions(self, session: _Session, start_position: int, n: int) -> None:
        if start_position != session.length:
            what = "skips ahead" if start_position > session.length else "rewinds"
            raise InvalidPositions(
                f"step at position {start_position} {what}: session {session.session_id} has processed "
                f"{session.length} tokens, so its next step must start at {session.length}"
            )
        if session.length + n > session.max_length:
            raise SessionLimitExceeded(
                f"session {session.session_id} was opened for {session.max_length} tokens; "
                f"{session.length} + {n} would exceed it"
            )

    @contextmanager
    def _only_blocks(self, start: int, end: int) -> Iterator[None]:
        """Let only blocks [start, end) compute; callers hold the compute lock, so the swap is private."""
        if (start, end) == (self.start, self.end):
            yield
            return
        for index in self._hosted_layers:
            if not start <= index < end:
                self._layers[index] = _PASS_THROUGH
        try:
            yield
        finally:
            for index, layer in self._hosted_layers.items():
                self._layers[index] = layer

    def _validate_hidden(self, hidden: torch.Tensor) -> None:
        if not isinstance(hidden, torch.Tensor):
            raise InvalidTensor(f"hidden states must be a tensor, got {type(hidden).__name__}")
        if hidden.dtype != self.dtype:
            raise InvalidTensor(f"hidden states have dtype {hidden.dtype}, expected {self.dtype}")
        if hidden.ndim != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1 or hidden.shape[2] != self.hidden_size:
            raise InvalidTensor(
                f"hidden states have shape {tuple(hidden.shape)}, expected (1, n >= 1, {self.hidden_size})"
            )
        if not bool(torch.isfinite(hidden).all()):
            raise InvalidTensor("hidden states contain NaN or Inf")
