"""The SmolLM2 demo model through three in-process spans equals transformers' own generate()."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine
from coop.model.loading import load_full_model
from coop.model.manifest import Manifest
from coop.pipeline.generation import collect_tokens
from coop.pipeline.local import LocalChain
from coop.pipeline.sampling import SamplingParams

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"
SPANS = [(0, 10), (10, 20), (20, 30)]


def test_spans_match_transformers_generate(demo_model_dir: str) -> None:
    manifest = Manifest.load(demo_model_dir)
    client = ClientPart.load(demo_model_dir, device="cpu")
    prompt = client.encode_chat([{"role": "user", "content": QUESTION}])
    engines = [SpanEngine.load(demo_model_dir, a, b, device="cpu") for a, b in SPANS]
    chain = LocalChain(engines, max_length=len(prompt) + 32)
    ours = asyncio.run(collect_tokens(client, chain, prompt, SamplingParams(max_tokens=32)))

    reference = load_full_model(Path(demo_model_dir), manifest, torch.device("cpu"))
    with torch.inference_mode():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    expected = out[0, len(prompt) :].tolist()
    # generate() pads with pad_token_id after EOS; we stop at EOS
    assert ours == expected[: len(ours)]
    assert len(ours) == 32 or ours[-1] in manifest.eos_token_ids
    assert "Paris" in client.decode(ours)


def test_span_reads_only_its_blocks(demo_model_dir: str) -> None:
    manifest = Manifest.load(demo_model_dir)
    engine = SpanEngine.load(demo_model_dir, 0, 10, device="cpu")
    all_block_bytes = 4 * sum(b.param_count for b in manifest.blocks)  # float32
    held = engine.parameter_bytes()
    assert held == 4 * sum(b.param_count for b in manifest.blocks[:10])
    assert 0.30 < held / all_block_bytes < 0.36


def test_prepared_files_do_not_depend_on_the_environment(demo_model_dir: str) -> None:
    """HF_HUB_OFFLINE=1 (set in tests) must not leak into the files, or the content hash would differ
    between a member who prepared the model with it and one without."""
    tokenizer_config = json.loads((Path(demo_model_dir) / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tokenizer_config
