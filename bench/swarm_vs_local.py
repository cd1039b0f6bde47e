"""Swarm vs single process, measured in one run on this machine.

Prints local single-process tokens/s (transformers' own generate() on the same prepared
weights, and Coop's engine as one span), the swarm's tokens/s for one session (DHT + 3 node
processes + coordinator on loopback, streamed over the OpenAI API), their ratio, time to first
token for both, and the aggregate tokens/s of N concurrent sessions.

    .venv/bin/python bench/swarm_vs_local.py [--tokens 64] [--sessions 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from coop.launcher import LocalPool
from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine
from coop.model.loading import load_full_model
from coop.model.manifest import Manifest
from coop.model.prepare import prepare
from coop.pipeline.generation import generate_tokens
from coop.pipeline.local import LocalChain
from coop.pipeline.sampling import SamplingParams

PROMPT = "Write a long story about a brave knight and a dragon."
MODEL_DIR = Path(os.environ.get("COOP_BENCH_MODEL_DIR", ".cache/smollm2-demo"))


def local_transformers(client: ClientPart, prompt: list[int], tokens: int) -> tuple[float, float]:
    model = load_full_model(MODEL_DIR, Manifest.load(MODEL_DIR), torch.device("cpu"))
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        elapsed = time.perf_counter() - started
    return (out.shape[1] - len(prompt)) / elapsed, ttft


def local_engine(client: ClientPart, prompt: list[int], tokens: int) -> tuple[float, float]:
    engine = SpanEngine.load(MODEL_DIR, 0, client.manifest.num_blocks, device="cpu")

    async def run() -> tuple[float, float]:
        chain = LocalChain([engine], max_length=len(prompt) + tokens)
        started = time.perf_counter()
        first, count = 0.0, 0
        async for _ in generate_tokens(client, chain, prompt, SamplingParams(max_tokens=tokens)):
            count += 1
            first = first or time.perf_counter() - started
        await chain.close()
        return count / (time.perf_counter() - started), first

    asyncio.run(run())  # warm-up
    return asyncio.run(run())


def stream_once(url: str, tokens: int) -> tuple[int, float, float]:
    """(completion tokens, seconds, time to first token) for one streamed chat request."""
    body = {
        "model": "smollm2-demo",
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, count = 0.0, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and not first:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
    return count, time.perf_counter() - started, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    prepare("smollm2-demo", MODEL_DIR)
    client = ClientPart.load(MODEL_DIR, device="cpu")
    prompt = client.encode_chat([{"role": "user", "content": PROMPT}])
    hf_tps, hf_ttft = local_transformers(client, prompt, args.tokens)
    engine_tps, engine_ttft = local_engine(client, prompt, args.tokens)

    pool = LocalPool(str(MODEL_DIR))
    try:
        pool.start_dht()
        pool.start_nodes({"bench-1": "0:10", "bench-2": "10:20", "bench-3": "20:30"})
        pool.start_coordinator()
        stream_once(pool.url, 8)  # warm-up: connections, caches
        runs = [stream_once(pool.url, args.tokens) for _ in range(args.repeats)]
        swarm_tps = statistics.median(count / seconds for count, seconds, _ in runs)
        swarm_ttft = statistics.median(first for _, _, first in runs)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.sessions) as executor:
            results = list(executor.map(lambda _: stream_once(pool.url, args.tokens), range(args.sessions)))
        aggregate_tps = sum(count for count, _, _ in results) / (time.perf_counter() - started)
    finally:
        pool.stop()

    rows = [
        ("local, transformers generate()", hf_tps, hf_ttft),
        ("local, coop engine as one span", engine_tps, engine_ttft),
        ("swarm, 3 nodes, 1 session", swarm_tps, swarm_ttft),
    ]
    print(f"\nprompt {len(prompt)} tokens, {args.tokens} new tokens, {os.cpu_count()} CPU cores")
    for name, tps, ttft in rows:
        print(f"{name:34s} {tps:6.1f} tokens/s   time to first token {ttft * 1000:6.0f} ms")
    concurrent = f"swarm, {args.sessions} concurrent sessions"
    print(f"{concurrent:34s} {aggregate_tps:6.1f} tokens/s aggregate")
    print(f"ratio swarm / local (transformers): {swarm_tps / hf_tps:.2f}x")
    print(f"ratio {args.sessions} sessions / 1 session:      {aggregate_tps / swarm_tps:.2f}x")


if __name__ == "__main__":
    main()
