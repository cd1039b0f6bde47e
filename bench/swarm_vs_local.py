"""Swarm vs single process, measured in one run on this machine.

Prints local single-process tokens/s (transformers' own generate() on the same prepared
weights, with stock and with oneDNN-packed CPU Linear layers, each ratio printed against both; and
Coop's engine as one span, in the layout it measured as faster: coop/model/weight_layout.py), the
swarm's tokens/s for one session (DHT + 3 node processes + coordinator on loopback, streamed over the
OpenAI API), their ratio, time to first
token for both, the aggregate tokens/s of N concurrent sessions (8 and 16 by default), and start-up times (node start ->
announced, coordinator start -> ready, median of 5: bench/startup.py). With --pool it runs the swarm
twice, in development mode and as a member pool (mutual TLS with per-node certificates, signed
announcements and routes, API keys, receipts booked in a ledger), and prints what security costs.

The swarm's processes (3 nodes and a coordinator) share this machine's cores, so each runs
`--threads-per-process` torch threads (default: its share of the cores), as a node on a machine of
its own would use that machine's; more threads than cores spin against each other (measured on 2
cores: 4x slower steps). The local rows are measured with torch's default threads and with that
many, in rounds that alternate them (medians). The nodes run at their defaults (batched steps, the
weight layout each measures); `--node-batch-steps N` overrides their COOP_NODE_MAX_BATCH_STEPS (1: every
step alone).

    .venv/bin/python bench/swarm_vs_local.py [--tokens 64] [--sessions 8 16] [--node-batch-steps N] [--repeats 3]
        [--pool]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from unittest import mock

import httpx
import torch
from startup import measure_startup, print_startup  # bench/startup.py, beside this script

from coop.launcher import LocalPool
from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine
from coop.model.loading import load_full_model
from coop.model.manifest import Manifest
from coop.model.prepare import prepare
from coop.pipeline.generation import generate_tokens
from coop.pipeline.local import LocalChain
from coop.pipeline.sampling import SamplingParams
from coop.pool.registry import add_member, create_api_key, create_pool

PROMPT = "Write a long story about a brave knight and a dragon."
MODEL_DIR = Path(os.environ.get("COOP_BENCH_MODEL_DIR", ".cache/smollm2-demo"))


Run = Callable[[], tuple[float, float]]  # one measured generation: (tokens/s, time to first token)


def transformers_run(prompt: list[int], tokens: int, *, layout: str) -> Run:
    """generate() of the whole model, its CPU Linear weights in `layout` ("stock": transformers' own, or "packed")."""
    model = load_full_model(MODEL_DIR, Manifest.load(MODEL_DIR), torch.device("cpu"), layout=layout)
    ids = torch.tensor([prompt])

    def once() -> tuple[float, float]:
        with torch.inference_mode():
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - started
            started = time.perf_counter()
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            elapsed = time.perf_counter() - started
        return (out.shape[1] - len(prompt)) / elapsed, ttft

    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
    return once


def engine_run(client: ClientPart, prompt: list[int], tokens: int) -> Run:
    """Coop's engine as one span, through the same generation loop and batched heads as the swarm."""
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
    return lambda: asyncio.run(run())


def measure_local(runs: dict[str, Run], threads: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Each run's median (tokens/s, time to first token) over `repeats` rounds that alternate the runs (so a
    noisy moment hits all of them), at the faster of torch's default thread count and `threads`."""
    default = torch.get_num_threads()
    best: dict[str, tuple[float, float]] = {}
    for count in sorted({default, threads}):
        torch.set_num_threads(count)
        rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                rounds[name].append(run())
        for name, results in rounds.items():
            median = (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results))
            best[name] = max(best.get(name, median), median)
    torch.set_num_threads(default)
    return best


@cache
def http_client() -> httpx.Client:
    """One client for every request, as an OpenAI SDK client keeps one: building an httpx.Client loads
    its TLS context (~17 ms here), which a time to first token measured per request must not include,
    and its connections are kept alive."""
    return httpx.Client(timeout=600)


def stream_once(url: str, tokens: int, key: str | None = None, question: str = PROMPT) -> tuple[int, float, float]:
    """(completion tokens, seconds, time to first token) for one streamed chat request."""
    body = {
        "model": "smollm2-demo",
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, count = 0.0, 0
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with http_client().stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
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


def run_swarm(
    tokens: int, sessions: list[int], repeats: int, *, secure: bool, threads: int, batch_steps: int | None
) -> tuple[float, float, dict[int, float]]:
    """Medians of `repeats` rounds: (tokens/s of one session, its time to first token, {N: aggregate tokens/s
    of N sessions at once} for each N of `sessions`). `batch_steps`: the nodes' max_batch_steps (None: default)."""
    environment = {"OMP_NUM_THREADS": str(threads)}
    if batch_steps is not None:
        environment["COOP_NODE_MAX_BATCH_STEPS"] = str(batch_steps)
    with tempfile.TemporaryDirectory(prefix="coop-bench-") as scratch, mock.patch.dict(os.environ, environment):
        pool = LocalPool(str(MODEL_DIR))
        spans = {"bench-1": "0:10", "bench-2": "10:20", "bench-3": "20:30"}
        key = None
        try:
            if secure:
                pool_dir = Path(scratch) / "pool"
                create_pool(pool_dir, "Bench pool")
                members = {name: add_member(pool_dir, f"Uni {name}") for name in spans}
                coordinator = add_member(pool_dir, "Coordinator", role="coordinator")
                add_member(pool_dir, "Client")
                key = create_api_key(pool_dir, "Client")
                pool.start_dht(member=coordinator)
                pool.start_nodes(spans, members)
                pool.start_coordinator(
                    member=coordinator, api_keys=pool_dir / "api_keys.json", extra_args=["--pool-dir", str(pool_dir)]
                )
            else:
                pool.start_dht()
                pool.start_nodes(spans)
                pool.start_coordinator()
            stream_once(pool.url, 8, key)  # warm-up: connections, caches
            runs: list[tuple[int, float, float]] = []
            aggregates: dict[int, list[float]] = {n: [] for n in sessions}
            for _ in range(repeats):  # alternating, so that a noisy moment hits every figure
                runs.append(stream_once(pool.url, tokens, key))
                for n in sessions:
                    aggregates[n].append(concurrent_tps(pool.url, tokens, key, n))
            one_tps = statistics.median(count / seconds for count, seconds, _ in runs)
            ttft = statistics.median(first for _, _, first in runs)
            aggregate = {n: statistics.median(values) for n, values in aggregates.items()}
        finally:
            pool.stop()
    return one_tps, ttft, aggregate


def concurrent_tps(url: str, tokens: int, key: str | None, sessions: int) -> float:
    """Aggregate tokens/s of `sessions` streams started at once."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=sessions) as executor:
        results = list(executor.map(lambda _: stream_once(url, tokens, key), range(sessions)))
    return sum(count for count, _, _ in results) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sessions", type=int, nargs="+", default=[8, 16], help="concurrent sessions to measure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool", action="store_true", help="also run the swarm as a member pool (TLS, ledger)")
    parser.add_argument("--startup-repeats", type=int, default=5, help="node and coordinator starts to time, 0: none")
    parser.add_argument(
        "--threads-per-process",
        type=int,
        default=max(1, (os.cpu_count() or 1) // 4),
        help="torch threads of each swarm process (default: a quarter of the cores, for 3 nodes and a coordinator)",
    )
    parser.add_argument(
        "--node-batch-steps", type=int, default=None, help="override the nodes' max_batch_steps (1: no batched steps)"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    prepare("smollm2-demo", MODEL_DIR)
    client = ClientPart.load(MODEL_DIR, device="cpu")
    prompt = client.encode_chat([{"role": "user", "content": PROMPT}])
    threads = args.threads_per_process
    local = measure_local(
        {
            "stock": transformers_run(prompt, args.tokens, layout="stock"),
            "packed": transformers_run(prompt, args.tokens, layout="packed"),
            "engine": engine_run(client, prompt, args.tokens),
        },
        threads,
        args.repeats,
    )
    stock, packed = local["stock"], local["packed"]
    engine_tps, engine_ttft = local["engine"]

    swarm = {"threads": threads, "batch_steps": args.node_batch_steps}
    swarm_tps, swarm_ttft, aggregate_tps = run_swarm(args.tokens, args.sessions, args.repeats, secure=False, **swarm)
    if args.pool:
        pool_tps, pool_ttft, pool_aggregate = run_swarm(args.tokens, args.sessions, args.repeats, secure=True, **swarm)
    startup = measure_startup(args.startup_repeats)

    print(f"\nprompt {len(prompt)} tokens, {args.tokens} new tokens, {os.cpu_count()} CPU cores")
    batching = "default" if args.node_batch_steps is None else str(args.node_batch_steps)
    print(f"swarm: {threads} torch threads per process, node max_batch_steps {batching}, load {os.getloadavg()}")
    print(f"client part's weight layout: {client.weight_layout.describe()}")
    print_row("local, transformers generate()", *stock)
    print_row("local, generate(), packed Linear", *packed)
    print_row("local, coop engine as one span", engine_tps, engine_ttft)
    print_row("swarm, 3 nodes, 1 session", swarm_tps, swarm_ttft)
    for n, tps in aggregate_tps.items():
        print_row(f"swarm, {n} concurrent sessions", tps)
    print("ratios against generate(): stock transformers (the issue's baseline) | with packed Linear weights")
    print(f"ratio swarm / local:                  {swarm_tps / stock[0]:.2f}x | {swarm_tps / packed[0]:.2f}x")
    print(f"ratio engine / local:                 {engine_tps / stock[0]:.2f}x | {engine_tps / packed[0]:.2f}x")
    print(f"ratio swarm / local time to first token: {swarm_ttft / stock[1]:.2f}x | {swarm_ttft / packed[1]:.2f}x")
    for n, tps in aggregate_tps.items():
        print(f"ratio {n} sessions / 1 session:      {tps / swarm_tps:.2f}x")
    if args.pool:
        print_row("member pool, 3 nodes, 1 session", pool_tps, pool_ttft)
        print(f"ratio member pool / development swarm, 1 session: {pool_tps / swarm_tps:.2f}x")
        for n, tps in pool_aggregate.items():
            print_row(f"member pool, {n} concurrent sessions", tps)
            print(f"ratio member pool / development swarm, {n} sessions: {tps / aggregate_tps[n]:.2f}x")
    if args.startup_repeats > 0:
        print_startup(startup)


def print_row(name: str, tps: float, ttft: float | None = None) -> None:
    """One line: tokens/s, and the time to first token of a single session (none for an aggregate)."""
    first = "aggregate" if ttft is None else f"  time to first token {ttft * 1000:6.0f} ms"
    print(f"{name:34s} {tps:6.1f} tokens/s {first}")


if __name__ == "__main__":
    main()
