"""What spot checks cost: aggregate tokens/s with checks at the default rate vs off, measured in one run.

One swarm of the demo model with two replicas of each span (DHT + 4 node processes on loopback),
and two coordinators on it: one with spot checks off, one at the default rate (sketches on every
step of every session, and the sampled sessions re-computed on the other replicas step by step).
Rounds of concurrent sessions alternate between the two, so drift in the machine's load hits both
alike. By default both the rate and the new-node rate are the default `spot_check_rate` (the steady
state, once nodes have a history); --new-node-rate measures a pool of new nodes.

    .venv/bin/python bench/verification_overhead.py [--tokens 32] [--sessions 8] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from coop.config import CoordinatorSettings
from coop.launcher import LocalPool
from coop.model.prepare import prepare
from tests.chat_requests import answered_chat

MODEL_DIR = Path(os.environ.get("COOP_BENCH_MODEL_DIR", ".cache/smollm2-demo"))
QUESTION = "Write a long story about a brave knight and a dragon."
DEFAULT_RATE = CoordinatorSettings.model_fields["spot_check_rate"].default


def round_tps(url: str, sessions: int, tokens: int) -> float:
    """Aggregate completion tokens/s of `sessions` greedy chats at once."""
    started = time.perf_counter()
    with ThreadPoolExecutor(sessions) as threads:
        bodies = list(threads.map(lambda _: answered_chat(url, None, QUESTION, tokens, timeout_s=600), range(sessions)))
    return sum(b["usage"]["completion_tokens"] for b in bodies) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE)
    parser.add_argument("--new-node-rate", type=float, default=None, help="default: --rate")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prepare("smollm2-demo", MODEL_DIR)

    pool = LocalPool(str(MODEL_DIR))
    try:
        pool.start_dht()
        pool.start_nodes({"a1": "0:15", "a2": "0:15", "b1": "15:30", "b2": "15:30"})
        os.environ["COOP_COORDINATOR_SPOT_CHECK_RATE"] = "0"
        os.environ["COOP_COORDINATOR_SPOT_CHECK_NEW_NODE_RATE"] = "0"
        off = pool.start_coordinator().ready["url"]
        os.environ["COOP_COORDINATOR_SPOT_CHECK_RATE"] = str(args.rate)
        new_node_rate = args.rate if args.new_node_rate is None else args.new_node_rate
        os.environ["COOP_COORDINATOR_SPOT_CHECK_NEW_NODE_RATE"] = str(new_node_rate)
        on = pool.start_coordinator().ready["url"]
        for url in (off, on):
            round_tps(url, 2, 4)  # warm-up: connections, caches
        measured: dict[str, list[float]] = {off: [], on: []}
        for _ in range(args.rounds):
            for url in (off, on):
                measured[url].append(round_tps(url, args.sessions, args.tokens))
    finally:
        pool.stop()
    tps_off, tps_on = (sum(measured[u]) / len(measured[u]) for u in (off, on))
    print(f"{args.rounds} rounds x {args.sessions} concurrent sessions x {args.tokens} tokens, alternating")
    print(f"checks off:                          {tps_off:7.1f} tokens/s  {[round(t, 1) for t in measured[off]]}")
    print(
        f"checks at {args.rate:.0%} (new nodes {new_node_rate:.0%}): {tps_on:7.1f} tokens/s  "
        f"{[round(t, 1) for t in measured[on]]}"
    )
    print(f"ratio on/off: {tps_on / tps_off:.3f}  (overhead {1 - tps_on / tps_off:+.1%})")


if __name__ == "__main__":
    main()
