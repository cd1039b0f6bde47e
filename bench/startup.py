"""Start-up times of a node and a coordinator, measured from outside as a user would see them.

- node start -> announced: from spawning `coop node start --blocks 0:10` (a prepared store) until
  a second process, with its own DHT peer, sees the node in the directory. A node announces only
  once its port is open and its blocks are loaded, so this is the time until it can be routed to.
- coordinator start -> ready: from spawning `coop coordinator start` beside 3 serving nodes until a
  one-token chat completion through it succeeds (which needs a route covering every block).

Each is the median of `repeats` starts, printed against the targets of issue 15.

    .venv/bin/python bench/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from coop.config import DEFAULT_POOL_ID
from coop.launcher import LocalPool, start
from coop.model.manifest import Manifest
from coop.model.prepare import prepare
from coop.swarm.directory import SwarmDirectory

MODEL_DIR = Path(os.environ.get("COOP_BENCH_MODEL_DIR", ".cache/smollm2-demo"))
NODE_TARGET_S = 3.0
COORDINATOR_TARGET_S = 5.0
POLL_S = 0.05
GIVE_UP_S = 120.0


@dataclass(frozen=True)
class StartupTimes:
    node_s: list[float]
    coordinator_s: list[float]
    load_averages: tuple[float, float]  # the machine's 1-minute load average before and after: start-up is CPU-bound


def node_to_announced(pool: LocalPool, observer: SwarmDirectory, model_hash: str, name: str) -> float:
    """Seconds from spawning a node until `observer` sees its announcement."""
    args = ["node", "start", "--model", str(MODEL_DIR), "--blocks", "0:10", "--initial-peers", pool.peer]
    started = time.perf_counter()
    node = start(name, [*args, "--node-id", name, "--device", "cpu"], None)
    try:
        while time.perf_counter() - started < GIVE_UP_S:
            if any(n.node_id == name for n in observer.list_nodes(DEFAULT_POOL_ID, model_hash)):
                return time.perf_counter() - started
            if not node.alive:
                raise RuntimeError(f"{name} exited:\n" + "\n".join(node.lines[-20:]))
            time.sleep(POLL_S)
        raise TimeoutError(f"{name} was not announced within {GIVE_UP_S:.0f} s")
    finally:
        node.stop()


def coordinator_to_ready(pool: LocalPool) -> float:
    """Seconds from spawning a coordinator until a one-token chat completion through it succeeds."""
    with socket.socket() as probe:  # a free port, so the API can be polled before the ready line
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["coordinator", "start", "--model", str(MODEL_DIR), "--port", str(port), "--initial-peers", pool.peer]
    body = {"model": "smollm2-demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    started = time.perf_counter()
    coordinator = start("coordinator", [*args, "--device", "cpu"], None)
    try:
        while time.perf_counter() - started < GIVE_UP_S:
            try:
                reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30)
                if reply.status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            if not coordinator.alive:
                raise RuntimeError("coordinator exited:\n" + "\n".join(coordinator.lines[-20:]))
            time.sleep(POLL_S)
        raise TimeoutError(f"coordinator not ready within {GIVE_UP_S:.0f} s")
    finally:
        coordinator.stop()


def measure_startup(repeats: int = 5) -> StartupTimes:
    """Node and coordinator start-up times on a fresh local pool (a DHT peer and 3 nodes)."""
    model_hash = Manifest.load(MODEL_DIR).content_hash
    load_before = os.getloadavg()[0]
    pool = LocalPool(str(MODEL_DIR))
    try:
        pool.start_dht()
        observer = SwarmDirectory.start([pool.peer])
        try:
            node_s = [node_to_announced(pool, observer, model_hash, f"startup-{i}") for i in range(repeats)]
        finally:
            observer.shutdown()
        pool.start_nodes({"startup-a": "0:10", "startup-b": "10:20", "startup-c": "20:30"})
        coordinator_s = [coordinator_to_ready(pool) for _ in range(repeats)]
    finally:
        pool.stop()
    return StartupTimes(node_s, coordinator_s, (load_before, os.getloadavg()[0]))


def print_startup(times: StartupTimes) -> None:
    for name, samples, target in (
        ("node start -> announced", times.node_s, NODE_TARGET_S),
        ("coordinator start -> ready", times.coordinator_s, COORDINATOR_TARGET_S),
    ):
        median = statistics.median(samples)
        runs = " ".join(f"{s:.1f}" for s in samples)
        verdict = "meets" if median <= target else "misses"
        print(f"{name:34s} {median:5.1f} s median of {len(samples)} ({runs}); {verdict} the target {target:.0f} s")
    print(f"{'load average (1 min)':34s} {times.load_averages[0]:.1f} before, {times.load_averages[1]:.1f} after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prepare("smollm2-demo", MODEL_DIR)
    print_startup(measure_startup(args.repeats))


if __name__ == "__main__":
    main()
