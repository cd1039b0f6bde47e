"""How fast a node's span decodes: estimated from its weights before it is measured, then measured."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from coop.model.manifest import Manifest

if TYPE_CHECKING:
    from coop.model.engine import SpanEngine

_THROUGHPUT_STEPS = 8

# What a decode token costs at least, per device type, for the estimate announced before the
# measurement: a fixed overhead per block (kernel launches, Python) plus every active weight of
# the span read once at a memory bandwidth well under any real machine's (a laptop CPU streams
# ~10 GB/s, a GPU hundreds).
_BLOCK_OVERHEAD_S = {"cpu": 2e-3, "cuda": 1e-3}
_WEIGHT_BYTES_PER_S = {"cpu": 1e9, "cuda": 50e9}

Measure = Callable[["SpanEngine"], float]


def estimate_throughput(manifest: Manifest, start: int, end: int, device_type: str) -> float:
    """Decode tokens per second that blocks [start, end) reach at least: what a node announces until measured."""
    weight_bytes = sum(b.active_param_count for b in manifest.blocks[start:end]) * manifest.bytes_per_weight
    overhead_s = _BLOCK_OVERHEAD_S.get(device_type, _BLOCK_OVERHEAD_S["cpu"])
    bandwidth = _WEIGHT_BYTES_PER_S.get(device_type, _WEIGHT_BYTES_PER_S["cpu"])
    return 1.0 / ((end - start) * overhead_s + weight_bytes / bandwidth)


def measure_throughput(engine: SpanEngine) -> float:
    """Decode tokens per second through the whole span, measured on a throwaway session."""
    session = engine.open_session(max_length=_THROUGHPUT_STEPS + 1)
    try:
        hidden = torch.zeros(1, 1, engine.hidden_size, dtype=engine.dtype)
        engine.step(session, hidden, 0)  # warm-up
        started = time.perf_counter()
        for position in range(1, _THROUGHPUT_STEPS + 1):
            engine.step(session, hidden, position)
        return _THROUGHPUT_STEPS / max(time.perf_counter() - started, 1e-6)
    finally:
        engine.close_session(session)
