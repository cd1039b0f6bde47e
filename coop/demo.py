"""`coop demo`: a whole pool on this machine in one command.

Prepares the demo model (cached), starts a DHT bootstrap peer, three nodes serving blocks 0:10,
10:20 and 20:30 as separate processes and a coordinator, asks one chat question through the
OpenAI-compatible API, and shows the answer, the route it took and the work each node did.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from coop.client import Client
from coop.launcher import LocalPool
from coop.model.prepare import prepare
from coop.node.client import node_info

DEMO_SPANS = {"demo-node-1": "0:10", "demo-node-2": "10:20", "demo-node-3": "20:30"}
DEMO_QUESTION = "What is the capital of France?"


def run_demo(model_dir: Path, *, port: int, question: str, once: bool, console: Console) -> None:
    console.rule("[bold]Coop demo")
    prepare("smollm2-demo", model_dir, console=console)
    pool = LocalPool(str(model_dir))
    try:
        console.print("starting a DHT bootstrap peer …")
        pool.start_dht()
        console.print(f"starting 3 nodes ({', '.join(DEMO_SPANS.values())}) …")
        pool.start_nodes(DEMO_SPANS)
        console.print("starting the coordinator …")
        pool.start_coordinator(port)
        _ask(pool, question, console)
        console.print(f"\nOpenAI-compatible API: [bold]{pool.url}/v1[/]   (health: {pool.url}/health)")
        console.print(f"DHT bootstrap peer:    {pool.peer}")
        console.print(f"more nodes can join:   coop node start --model {model_dir} --initial-peers {pool.peer}")
        if not once:
            console.print("\nThe pool keeps running; press Ctrl-C to stop it.")
            _wait_for_ctrl_c()
    finally:
        console.print("stopping the pool …")
        pool.stop()


def _ask(pool: LocalPool, question: str, console: Console) -> None:
    console.print(f"\n[bold]Q:[/] {question}")
    result = Client(pool.url, timeout_s=300).chat([{"role": "user", "content": question}], temperature=0, max_tokens=64)
    console.print(f"[bold]A:[/] {result.text}")
    console.print(f"({result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} completion tokens)\n")
    route = Table(title="route and work per node")
    for column in ("node", "blocks", "endpoint", "steps run", "pushed on", "returned"):
        route.add_column(column)
    for hop in result.route:
        info = node_info(str(hop["endpoint"]))
        route.add_row(
            str(hop["node_id"]),
            f"{hop['start']}:{hop['end']}",
            str(hop["endpoint"]),
            str(info.counters.steps_run),
            str(info.counters.pushes_sent),
            str(info.counters.results_sent),
        )
    console.print(route)


def _wait_for_ctrl_c() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
