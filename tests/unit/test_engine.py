"""Block engine: sessions, cache accounting, and bad input that must not corrupt other sessions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from coop.errors import (
    CacheBudgetExceeded,
    InvalidPositions,
    InvalidTensor,
    ModelIntegrityError,
    ModelNotFound,
    SessionExists,
    SessionLimitExceeded,
    SpanOutOfRange,
    UnknownSession,
)
from coop.model.engine import SpanEngine
from coop.model.manifest import Manifest

HIDDEN = 64


def _hidden(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_unknown_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        SpanEngine.load(tmp_path / "nope", 0, 1)
    with pytest.raises(ModelNotFound, match="not a prepared Coop model"):
        SpanEngine.load(tmp_path, 0, 1)


def test_corrupted_block_file_is_named(tiny_llama_dir: str, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, copy)
    block = copy / "blocks" / "0004.safetensors"
    data = bytearray(block.read_bytes())
    data[-10] ^= 0xFF
    block.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"blocks/0004\.safetensors is corrupt"):
        SpanEngine.load(copy, 3, 6)
    # a span that does not include the damaged block never reads it
    assert SpanEngine.load(copy, 0, 3).end == 3


@pytest.mark.parametrize("span", [(-1, 2), (0, 0), (4, 2), (0, 7), (6, 7)])
def test_span_out_of_range(tiny_llama_dir: str, span: tuple[int, int]) -> None:
    with pytest.raises(SpanOutOfRange, match="blocks 0:6"):
        SpanEngine.load(tiny_llama_dir, *span)


@pytest.fixture()
def engine(tiny_llama_dir: str) -> SpanEngine:
    return SpanEngine.load(tiny_llama_dir, 2, 5, device="cpu")


def test_bad_steps_leave_sessions_intact(engine: SpanEngine, tiny_llama_dir: str) -> None:
    good = engine.open_session("good", max_length=32)
    victim = engine.open_session("victim", max_length=32)
    engine.step(victim, _hidden(3), 0)
    bad_inputs: list[tuple[torch.Tensor, int, type[Exception], str]] = [
        (torch.randn(1, 2, HIDDEN + 1), 3, InvalidTensor, "shape"),
        (torch.randn(1, 2, HIDDEN, dtype=torch.float16), 3, InvalidTensor, "dtype"),
        (torch.randn(2, 2, HIDDEN), 3, InvalidTensor, "shape"),
        (torch.randn(1, 0, HIDDEN), 3, InvalidTensor, "shape"),
        (torch.full((1, 2, HIDDEN), float("nan")), 3, InvalidTensor, "NaN"),
        (torch.full((1, 2, HIDDEN), float("inf")), 3, InvalidTensor, "Inf"),
        (_hidden(2), 5, InvalidPositions, "skips ahead"),
        (_hidden(2), 1, InvalidPositions, "rewinds"),
    ]
    for hidden, position, error, message in bad_inputs:
        with pytest.raises(error, match=message):
            engine.step(victim, hidden, position)
    assert engine.session_length(victim) == 3

    # the victim continues exactly as an untouched session would
    engine.step(good, _hidden(3), 0)
    assert torch.equal(engine.step(victim, _hidden(2, seed=7), 3), engine.step(good, _hidden(2, seed=7), 3))


def test_unknown_and_duplicate_sessions(engine: SpanEngine) -> None:
    with pytest.raises(UnknownSession, match="no session ghost"):
        engine.step("ghost", _hidden(1), 0)
    with pytest.raises(UnknownSession):
        engine.close_session("ghost")
    engine.open_session("s", max_length=8)
    with pytest.raises(SessionExists):
        engine.open_session("s", max_length=8)


def test_max_length_is_enforced(engine: SpanEngine) -> None:
    sid = engine.open_session(max_length=4)
    engine.step(sid, _hidden(3), 0)
    with pytest.raises(SessionLimitExceeded, match="opened for 4 tokens"):
        engine.step(sid, _hidden(2), 3)


def test_cache_accounting_and_budget(tiny_llama_dir: str) -> None:
    manifest = Manifest.load(tiny_llama_dir)
    config = manifest.config
    per_token = 2 * config["num_key_value_heads"] * (config["hidden_size"] // config["num_attention_heads"]) * 4 * 3
    engine = SpanEngine.load(tiny_llama_dir, 2, 5, device="cpu", cache_budget_bytes=100 * per_token)
    assert engine.bytes_per_token == per_token
    first = engine.open_session(max_length=60)
    engine.step(first, _hidden(7), 0)
    assert engine.cache_bytes(first) == 7 * per_token
    assert engine.free_cache_bytes == 40 * per_token
    with pytest.raises(CacheBudgetExceeded, match="budget exceeded"):
        engine.open_session(max_length=41)
    engine.open_session(max_length=40)  # exactly what is left
    engine.close_session(first)
    assert engine.free_cache_bytes == 60 * per_token


def test_idle_sessions_are_freed(tiny_llama_dir: str) -> None:
    engine = SpanEngine.load(tiny_llama_dir, 0, 2, device="cpu", idle_timeout_s=10.0)
    sid = engine.open_session(max_length=8)
    engine.step(sid, _hidden(1), 0)
    assert engine.evict_idle() == []
    import time

    assert engine.evict_idle(now=time.monotonic() + 11.0) == [sid]
    with pytest.raises(UnknownSession, match="expired"):
        engine.step(sid, _hidden(1), 1)


def test_sub_span_session_matches_a_smaller_engine(tiny_llama_dir: str) -> None:
    """A session over part of an engine's span computes exactly what an engine of that part does."""
    wide = SpanEngine.load(tiny_llama_dir, 1, 6, device="cpu")
    narrow = SpanEngine.load(tiny_llama_dir, 2, 4, device="cpu")
    part = wide.open_session(max_length=16, start=2, end=4)
    full = wide.open_session(max_length=16)
    ref = narrow.open_session(max_length=16)
    for position, n in [(0, 4), (4, 1), (5, 1)]:
        hidden = _hidden(n, seed=position)
        expected = narrow.step(ref, hidden, position)
        assert torch.equal(wide.step(part, hidden, position), expected)
        assert not torch.equal(wide.step(full, hidden, position), expected)
    assert wide.cache_bytes(part) == 6 * wide.bytes_per_token_per_block * 2
    with pytest.raises(SpanOutOfRange, match="not within"):
        wide.open_session(max_length=4, start=0, end=3)


def test_a_refused_chain_releases_what_it_opened(tiny_llama_dir: str) -> None:
    from coop.pipeline.local import LocalChain

    roomy = SpanEngine.load(tiny_llama_dir, 0, 3, device="cpu")
    tight = SpanEngine.load(tiny_llama_dir, 3, 6, device="cpu", cache_budget_bytes=1)
    with pytest.raises(CacheBudgetExceeded):
        LocalChain([roomy, tight], max_length=8)
    assert roomy.session_count == 0 and roomy.free_cache_bytes == roomy.cache_budget_bytes
    with pytest.raises(SpanOutOfRange, match="contiguous"):
        LocalChain([tight, roomy], max_length=8)
