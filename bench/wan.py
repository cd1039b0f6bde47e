"""The demo pool as if its nodes were institutions apart: a one-way delay on every hop.

Three nodes (blocks 0:10, 10:20, 20:30) each sit behind a delaying TCP proxy (bench/delay_proxy.py),
announced as the node's public endpoint (`coop node start --public-endpoint`), so every hop pays the
delay: coordinator -> node 1 -> node 2 -> node 3 -> coordinator, four one-way delays per step. Two
coordinators share the nodes, one with multi-token steps (speculative_tokens, default 4) and one
without (0). For each delay it prints tokens/s and time to first token of one streamed session
(median of --repeats) and the aggregate tokens/s of --sessions at once, on a prompt with repetition
and an open-ended one, and the ratio multi-token / one-token steps.

    PYTHONPATH=$PWD .venv/bin/python bench/wan.py [--delays-ms 0,10,25] [--tokens 64] [--sessions 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from delay_proxy import DelayProxy
from swarm_vs_local import MODEL_DIR, stream_once

from coop.launcher import LocalPool, start
from coop.model.prepare import prepare

PARAGRAPH = (
    "The river rises in the hills above the town, runs past the old mill and the school, and reaches the sea "
    "after forty miles of farmland. In spring it floods the lower fields; in summer children swim in its slow "
    "brown pools."
)
PROMPTS = {
    "repetition": f"Repeat this paragraph exactly, word for word:\n\n{PARAGRAPH}",
    "open-ended": "Write a short story about a lighthouse keeper.",
}
SPANS = {"wan-1": "0:10", "wan-2": "10:20", "wan-3": "20:30"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProxyLoop:
    """The proxies' event loop, in a thread of its own beside the synchronous benchmark."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="delay-proxies", daemon=True).start()
        self.proxies: list[DelayProxy] = []

    def add(self, target_port: int) -> int:
        proxy = DelayProxy(target_port)
        self.proxies.append(proxy)
        return asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result()

    def set_delay(self, delay_s: float) -> None:
        for proxy in self.proxies:
            proxy.delay_s = delay_s


def start_pool(proxies: ProxyLoop, speculative_tokens: list[int]) -> tuple[LocalPool, dict[int, str]]:
    """DHT, three proxied nodes, and one coordinator per speculative_tokens value (their URLs)."""
    pool = LocalPool(str(MODEL_DIR))
    pool.start_dht()
    for name, blocks in SPANS.items():
        port = free_port()
        public = proxies.add(port)
        args = ["node", "start", "--model", str(MODEL_DIR), "--blocks", blocks, "--initial-peers", pool.peer]
        args += ["--node-id", name, "--device", "cpu", "--port", str(port), "--public-endpoint", f"127.0.0.1:{public}"]
        pool.nodes[name] = start(name, args, None)
        pool.processes.append(pool.nodes[name])
    for name in SPANS:
        pool.nodes[name].wait_ready("COOP_NODE_READY")
    urls = {}
    for tokens in speculative_tokens:
        os.environ["COOP_COORDINATOR_SPECULATIVE_TOKENS"] = str(tokens)
        urls[tokens] = pool.start_coordinator().ready["url"]
    os.environ.pop("COOP_COORDINATOR_SPECULATIVE_TOKENS")
    return pool, urls


def measure(url: str, question: str, tokens: int, repeats: int, sessions: int) -> tuple[float, float, float]:
    """(tokens/s of one session, its time to first token, aggregate tokens/s of `sessions` at once)."""
    runs = [stream_once(url, tokens, question=question) for _ in range(repeats)]
    one = statistics.median(count / seconds for count, seconds, _ in runs)
    ttft = statistics.median(first for _, _, first in runs)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=sessions) as executor:
        results = list(executor.map(lambda _: stream_once(url, tokens, question=question), range(sessions)))
    return one, ttft, sum(count for count, _, _ in results) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delays-ms", default="0,10,25", help="one-way delay per hop, comma-separated")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--speculative-tokens", type=int, default=4, help="draft tokens per multi-token step")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prepare("smollm2-demo", Path(MODEL_DIR))

    proxies = ProxyLoop()
    pool, urls = start_pool(proxies, [0, args.speculative_tokens])
    rows = []
    try:
        for url in urls.values():
            stream_once(url, 8)  # warm-up: channels, caches, measured step times
        for delay_ms in [float(d) for d in args.delays_ms.split(",")]:
            proxies.set_delay(delay_ms / 1000)
            for prompt_name, question in PROMPTS.items():
                one = measure(urls[0], question, args.tokens, args.repeats, args.sessions)
                multi = measure(urls[args.speculative_tokens], question, args.tokens, args.repeats, args.sessions)
                rows.append((delay_ms, prompt_name, one, multi))
                print(f"measured {delay_ms:g} ms {prompt_name}: {one[0]:.1f} -> {multi[0]:.1f} tokens/s", flush=True)
    finally:
        pool.stop()

    print(f"\n{args.tokens} new tokens at most, 3 nodes, {os.cpu_count()} CPU cores; one-token -> multi-token steps")
    print(
        "| one-way delay per hop | prompt | tokens/s (1 session) | TTFT | aggregate tokens/s "
        f"({args.sessions} sessions) | multi / one |"
    )
    print("|---|---|---|---|---|---|")
    for delay_ms, prompt_name, one, multi in rows:
        print(
            f"| {delay_ms:g} ms | {prompt_name} | {one[0]:.1f} -> {multi[0]:.1f} | "
            f"{one[1] * 1000:.0f} -> {multi[1] * 1000:.0f} ms | {one[2]:.1f} -> {multi[2]:.1f} | "
            f"{multi[0] / one[0]:.2f}x |"
        )


if __name__ == "__main__":
    main()
