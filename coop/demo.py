"""`coop demo`: a whole pool on this machine in one command.

Prepares the demo model (cached), starts a DHT bootstrap peer, three nodes serving blocks 0:10,
10:20 and 20:30 as separate processes and a coordinator, asks one chat question through the
OpenAI-compatible API, and shows the answer, the route it took and the work each node did.
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from coop.client import Client
from coop.identity import add_member, create_api_key, create_pool
from coop.launcher import LocalPool
from coop.membership import Membership
from coop.model.prepare import prepare
from coop.node.client import node_info
from coop.wire.channels import ChannelSecurity

DEMO_SPANS = {"demo-node-1": "0:10", "demo-node-2": "10:20", "demo-node-3": "20:30"}
DEMO_QUESTION = "What is the capital of France?"
DEMO_INSTITUTIONS = {
    "demo-node-1": "Demo University A",
    "demo-node-2": "Demo University B",
    "demo-node-3": "Demo Lab C",
}


def create_demo_pool(directory: Path) -> tuple[dict[str, Path], Path, str]:
    """A throwaway pool: one member institution per node, one for the coordinator, one API key."""
    create_pool(directory, "Coop demo pool")
    nodes = {node: add_member(directory, institution) for node, institution in DEMO_INSTITUTIONS.items()}
    coordinator = add_member(directory, "Demo Coordinator")
    add_member(directory, "Demo Client Institute")
    return nodes, coordinator, create_api_key(directory, "Demo Client Institute")


def run_demo(model_dir: Path, *, port: int, question: str, once: bool, console: Console) -> None:
    console.rule("[bold]Coop demo")
    prepare("smollm2-demo", model_dir, console=console)
    with tempfile.TemporaryDirectory(prefix="coop-demo-pool-") as scratch:
        pool_dir = Path(scratch) / "pool"
        node_members, coordinator_member, api_key = create_demo_pool(pool_dir)
        console.print(f"created a throwaway pool in {pool_dir}: a CA, {len(node_members) + 2} member bundles")
        pool = LocalPool(str(model_dir))
        try:
            console.print("starting a DHT bootstrap peer …")
            pool.start_dht()
            console.print(f"starting 3 nodes ({', '.join(DEMO_SPANS.values())}), mutual TLS, signed announcements …")
            pool.start_nodes(DEMO_SPANS, node_members)
            console.print("starting the coordinator …")
            pool.start_coordinator(port, coordinator_member, pool_dir / "api_keys.json")
            _ask(pool, api_key, question, Membership.load(coordinator_member).channel_security(), console)
            _show_access(pool, model_dir, api_key, console)
            if not once:
                console.print("\nThe pool keeps running; press Ctrl-C to stop it.")
                _wait_for_ctrl_c()
        finally:
            console.print("stopping the pool …")
            pool.stop()


def _show_access(pool: LocalPool, model_dir: Path, api_key: str, console: Console) -> None:
    console.print(f"\nOpenAI-compatible API: [bold]{pool.url}/v1[/]   (health: {pool.url}/health)")
    console.print(f"demo API key:          {api_key}")
    console.print(f"DHT bootstrap peer:    {pool.peer}")
    console.print("admin web view:        not built yet")


def _ask(pool: LocalPool, api_key: str, question: str, security: ChannelSecurity, console: Console) -> None:
    console.print(f"\n[bold]Q:[/] {question}")
    result = Client(pool.url, api_key=api_key, timeout_s=300).chat(
        [{"role": "user", "content": question}], temperature=0, max_tokens=64
    )
    console.print(f"[bold]A:[/] {result.text}")
    console.print(f"({result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} completion tokens)\n")
    route = Table(title="route and work per node")
    for column in ("node", "blocks", "endpoint", "steps run", "pushed on", "returned"):
        route.add_column(column)
    for hop in result.route:
        info = node_info(str(hop["endpoint"]), security)
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
