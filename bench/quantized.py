"""Quantized spans against the float model, measured in one run on this machine.

For each quantization (none, int8, int4) of the demo model (prepared once into
.cache/smollm2-demo[-int8|-int4]) it prints the bytes of one block file, tokens/s of Coop's engine as
one span (greedy, streamed, the first token included), tokens/s of transformers' own generate() on
the same prepared weights, and how many greedy tokens agree with the float model's before the first
difference.

    .venv/bin/python bench/quantized.py [--tokens 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine
from coop.model.loading import load_full_model
from coop.model.prepare import DEMO_MODEL, prepare
from coop.model.quantization import QUANTIZATIONS
from coop.pipeline.generation import generate_tokens
from coop.pipeline.local import LocalChain
from coop.pipeline.sampling import SamplingParams

PROMPT = "Write a long story about a brave knight and a dragon."
FLOAT_DIR = Path(".cache/smollm2-demo")
REPEATS = 5


def model_dir(quantization: str) -> Path:
    return FLOAT_DIR if quantization == "none" else FLOAT_DIR.with_name(f"{FLOAT_DIR.name}-{quantization}")


@dataclass
class Setup:
    """One quantization of the demo model, loaded both ways, and its measurements."""

    client: ClientPart
    engine: SpanEngine
    full_model: PreTrainedModel
    block_mib: float
    engine_tps: list[float] = field(default_factory=list)
    generate_tps: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


def load_setup(quantization: str, device: str) -> Setup:
    directory = model_dir(quantization)
    manifest = prepare(DEMO_MODEL, directory, quantize=quantization, quiet=True)
    return Setup(
        client=ClientPart.load(directory, device=device),
        engine=SpanEngine.load(directory, 0, manifest.num_blocks, device=device),
        full_model=load_full_model(directory, manifest, torch.device(device)),
        block_mib=statistics.mean((directory / b.file).stat().st_size for b in manifest.blocks) / 2**20,
    )


def time_engine(setup: Setup, prompt: list[int], tokens: int) -> None:
    """Coop's engine as one span: greedy tokens streamed, the first token included."""

    async def run() -> None:
        chain = LocalChain([setup.engine], max_length=len(prompt) + tokens)
        started = time.perf_counter()
        params = SamplingParams(max_tokens=tokens)
        ids = [token async for token in generate_tokens(setup.client, chain, prompt, params)]
        setup.engine_tps.append(len(ids) / (time.perf_counter() - started))
        setup.token_ids = ids
        await chain.close()

    asyncio.run(run())


def time_generate(setup: Setup, prompt: list[int], tokens: int) -> None:
    """transformers' own generate() on the same prepared weights."""
    ids = torch.tensor([prompt], device=setup.engine.device)
    with torch.inference_mode():
        started = time.perf_counter()
        out = setup.full_model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    setup.generate_tps.append((out.shape[1] - len(prompt)) / (time.perf_counter() - started))


def agreeing_prefix(ids: list[int], reference: list[int]) -> int:
    for index, (a, b) in enumerate(zip(ids, reference, strict=False)):
        if a != b:
            return index
    return min(len(ids), len(reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    setups = {q: load_setup(q, args.device) for q in QUANTIZATIONS}
    prompt = setups["none"].client.encode_chat([{"role": "user", "content": PROMPT}])
    for setup in setups.values():  # warm-up
        time_engine(setup, prompt, 4)
        time_generate(setup, prompt, 4)
        setup.engine_tps.clear()
        setup.generate_tps.clear()
    for _ in range(REPEATS):  # interleaved, so that load from elsewhere hits every quantization alike
        for setup in setups.values():
            time_engine(setup, prompt, args.tokens)
            time_generate(setup, prompt, args.tokens)

    reference = setups["none"].token_ids
    print(f"demo model, {args.tokens} greedy tokens, {args.device}, median of {REPEATS} interleaved runs")
    print(f"{'weights':8} {'block file MiB':>14} {'engine tok/s':>13} {'generate() tok/s':>17} {'agree w/ float':>15}")
    for quantization, setup in setups.items():
        engine_tps, generate_tps = statistics.median(setup.engine_tps), statistics.median(setup.generate_tps)
        agree = f"{agreeing_prefix(setup.token_ids, reference)}/{len(reference)}"
        print(f"{quantization:8} {setup.block_mib:14.2f} {engine_tps:13.1f} {generate_tps:17.1f} {agree:>15}")


if __name__ == "__main__":
    main()
