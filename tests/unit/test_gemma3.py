"""Gemma 3 270M (real pretrained weights) through three in-process spans equals transformers' own generate().

Gemma 3 scales its embeddings, normalises queries and keys, and interleaves sliding-window layers with
global ones; the span engine knows none of it by name. The long prompt outgrows the sliding window, so
the sliding layers' caches must forget exactly as transformers' do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine
from coop.model.loading import load_full_model
from coop.model.manifest import Manifest
from coop.pipeline.generation import collect_tokens
from coop.pipeline.local import LocalChain
from coop.pipeline.sampling import SamplingParams

pytestmark = pytest.mark.slow
SPANS = [(0, 6), (6, 12), (12, 18)]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def client(gemma3_model_dir: str) -> ClientPart:
    return ClientPart.load(gemma3_model_dir, device="cpu", weight_layout="stock")


@pytest.fixture(scope="module")
def engines(gemma3_model_dir: str) -> list[SpanEngine]:
    return [SpanEngine.load(gemma3_model_dir, a, b, device="cpu", weight_layout="stock") for a, b in SPANS]


@pytest.fixture(scope="module")
def reference(gemma3_model_dir: str) -> Iterator[PreTrainedModel]:
    manifest = Manifest.load(gemma3_model_dir)
    yield load_full_model(Path(gemma3_model_dir), manifest, torch.device("cpu"), layout="stock")


def _spans_and_reference(
    client: ClientPart, engines: list[SpanEngine], reference: PreTrainedModel, prompt: list[int]
) -> tuple[list[int], list[int]]:
    chain = LocalChain(engines, max_length=len(prompt) + NEW_TOKENS)
    ours = asyncio.run(collect_tokens(client, chain, prompt, SamplingParams(max_tokens=NEW_TOKENS)))
    with torch.inference_mode():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return ours, out[0, len(prompt) :].tolist()


def test_gemma3_is_prepared_with_interleaved_sliding_layers(gemma3_model_dir: str, engines: list[SpanEngine]) -> None:
    manifest = Manifest.load(gemma3_model_dir)
    assert (manifest.model_type, manifest.num_blocks) == ("gemma3_text", 18)
    layer_types = manifest.config["layer_types"]
    assert [i for i, t in enumerate(layer_types) if t == "full_attention"] == [5, 11, 17]
    assert manifest.config["sliding_window"] == 512
    assert not any(e.can_batch or e.can_rewind for e in engines)  # packed masks are full causal ones


def test_gemma3_spans_match_transformers_generate(
    client: ClientPart, engines: list[SpanEngine], reference: PreTrainedModel
) -> None:
    prompt = client.encode("The capital of Germany is Berlin. The capital of Italy is Rome. The capital of France is")
    assert prompt[0] == client.tokenizer.bos_token_id  # type: ignore[union-attr]  # Gemma needs its BOS
    ours, expected = _spans_and_reference(client, engines, reference, prompt)
    assert ours == expected[: len(ours)]
    assert len(ours) == NEW_TOKENS
    assert client.decode(ours).strip().startswith("Paris")  # a pretrained model, so a few-shot prompt


def test_gemma3_prompt_longer_than_the_sliding_window(
    client: ClientPart, engines: list[SpanEngine], reference: PreTrainedModel
) -> None:
    text = " ".join(f"Item {i} of the list is the number {i * 7 % 101}." for i in range(60))
    prompt = client.encode(text + " Item 60 of the list is the number")
    assert len(prompt) > 512 + NEW_TOKENS
    ours, expected = _spans_and_reference(client, engines, reference, prompt)
    assert ours == expected[: len(ours)]
    assert len(ours) == NEW_TOKENS
