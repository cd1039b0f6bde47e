"""Split execution equals the unsplit transformers model, for several architecture families."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine
from coop.model.prepare import prepare
from coop.pipeline.local import LocalChain
from tests.tiny_models import TINY_CONFIGS, save_tiny_model

PROMPT = [5, 17, 42, 8, 91, 3, 60]
DECODE_STEPS = 20
ATOL = 1e-5


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("spans", [[(0, 2), (2, 4), (4, 6)], [(0, 5), (5, 6)]])
def test_split_matches_unsplit(tmp_path: Path, family: str, spans: list[tuple[int, int]]) -> None:
    hf_dir = save_tiny_model(family, tmp_path / "hf")
    prepare(str(hf_dir), tmp_path / "coop", dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    client = ClientPart.load(tmp_path / "coop", device="cpu")
    engines = [SpanEngine.load(tmp_path / "coop", a, b, device="cpu") for a, b in spans]
    chain = LocalChain(engines, max_length=64)

    ref_cache = DynamicCache(config=reference.config)
    tokens = list(PROMPT)
    ref_tokens = list(PROMPT)
    position = 0
    with torch.inference_mode():
        for step in range(DECODE_STEPS + 1):
            new = tokens[position:]
            ref_logits = reference(
                torch.tensor([ref_tokens[position:]]), past_key_values=ref_cache, use_cache=True
            ).logits
            hidden = asyncio.run(chain.step(client.embed(torch.tensor([new])), position))
            logits = client.logits(hidden, last_only=False)
            assert logits.shape == ref_logits.shape
            torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0, msg=f"{family} step {step}")
            position += len(new)
            tokens.append(int(logits[0, -1].argmax()))
            ref_tokens.append(int(ref_logits[0, -1].argmax()))
    assert tokens == ref_tokens
    asyncio.run(chain.close())
