"""`coop demo`: a whole pool on this machine in one command.

Prepares the demo model (cached), starts a DHT bootstrap peer, three nodes serving blocks 0:10,
10:20 and 20:30 as separate processes and a coordinator, asks one chat question through the
OpenAI-compatible API, and shows the answer, the route it took, the work each node did and the
ledger that work was booked in: who served what, who used what.
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from coop.cli.console import console, plain

if TYPE_CHECKING:
    from coop.launcher import LocalPool
    from coop.wire.channels import ChannelSecurity

DEMO_SPANS = {"demo-node-1": "0:10", "demo-node-2": "10:20", "demo-node-3": "20:30"}
DEMO_QUESTION = "What is the capital of France?"
LEDGER_WAIT_S = 30.0
DEMO_INSTITUTIONS = {
    "demo-node-1": "Demo University A",
    "demo-node-2": "Demo University B",
    "demo-node-3": "Demo Lab C",
}


@dataclass(frozen=True)
class DemoPool:
    nodes: dict[str, Path]  # node name -> its institution's member bundle
    coordinator: Path
    api_key: str
    admin_token: str


def demo(
    model_dir: Annotated[Path, typer.Option("--model-dir", help="where the demo model is prepared (cached)")] = Path(
        ".cache/smollm2-demo"
    ),
    port: Annotated[int, typer.Option(help="HTTP port of the coordinator (0 = any free port)")] = 8000,
    question: Annotated[str, typer.Option()] = DEMO_QUESTION,
    once: Annotated[bool, typer.Option("--once", help="exit after the answer")] = False,
) -> None:
    """A local pool in one command: DHT, three nodes, a coordinator, and one chat question."""
    run_demo(model_dir, port=port, question=question, once=once)


def create_demo_pool(directory: Path) -> DemoPool:
    """A throwaway pool: one member institution per node, one for the coordinator, one API key."""
    from coop.pool.ca import ROLE_COORDINATOR
    from coop.pool.registry import add_member, create_api_key, create_pool

    info = create_pool(directory, "Coop demo pool")
    nodes = {node: add_member(directory, institution) for node, institution in DEMO_INSTITUTIONS.items()}
    coordinator = add_member(directory, "Demo Coordinator", role=ROLE_COORDINATOR)
    add_member(directory, "Demo Client Institute")
    api_key = create_api_key(directory, "Demo Client Institute")
    assert info.admin_token is not None  # create_pool always returns it
    return DemoPool(nodes, coordinator, api_key, info.admin_token)


def run_demo(model_dir: Path, *, port: int, question: str, once: bool) -> None:
    from coop.launcher import LocalPool
    from coop.model.prepare import prepare
    from coop.pool.membership import Membership

    console.rule("[bold]Coop demo")
    prepare("smollm2-demo", model_dir, console=console)
    with tempfile.TemporaryDirectory(prefix="coop-demo-pool-") as scratch:
        pool_dir = Path(scratch) / "pool"
        demo = create_demo_pool(pool_dir)
        console.print(f"created a throwaway pool in {plain(pool_dir)}: a CA, {len(demo.nodes) + 2} member bundles")
        pool = LocalPool(str(model_dir))
        try:
            console.print("starting a DHT bootstrap peer …")
            pool.start_dht(member=demo.coordinator)  # holds only records the pool signed
            console.print(f"starting 3 nodes ({', '.join(DEMO_SPANS.values())}), mutual TLS, signed announcements …")
            pool.start_nodes(DEMO_SPANS, demo.nodes)
            console.print("starting the coordinator …")
            extra = ["--pool-dir", str(pool_dir), "--receipt-interval-s", "0.5"]
            pool.start_coordinator(port, demo.coordinator, pool_dir / "api_keys.json", extra_args=extra)
            _ask(pool, demo.api_key, question, Membership.load(demo.coordinator).channel_security())
            _show_ledger(pool_dir)
            _show_access(pool, demo, pool_dir)
            if not once:
                console.print("\nThe pool keeps running; press Ctrl-C to stop it.")
                _wait_for_ctrl_c()
        finally:
            console.print("stopping the pool …")
            pool.stop()


def _show_ledger(pool_dir: Path) -> None:
    """Wait for the nodes' receipts to be booked, then show who served and who used what."""
    from coop.cli.ledger import balances_table
    from coop.ledger.database import LEDGER_FILE, sqlite_url
    from coop.ledger.store import Ledger

    ledger = Ledger.open(sqlite_url(pool_dir / LEDGER_FILE))
    try:
        deadline = time.monotonic() + LEDGER_WAIT_S
        while len(ledger.receipts()) < len(DEMO_SPANS) and time.monotonic() < deadline:
            time.sleep(0.2)
        console.print(
            f"\n{len(ledger.receipts())} signed receipts booked in the ledger ({plain(pool_dir / LEDGER_FILE)})"
        )
        console.print(balances_table(ledger))
    finally:
        ledger.close()
    console.print(f"(the same with `coop ledger balances --pool {plain(pool_dir)}`; check it: `coop ledger verify`)")


def _show_access(pool: LocalPool, demo: DemoPool, pool_dir: Path) -> None:
    console.print(f"\nOpenAI-compatible API: [bold]{pool.url}/v1[/]   (health: {pool.url}/health)")
    console.print(f"demo API key:          {demo.api_key}")
    console.print(f"DHT bootstrap peer:    {pool.peer}")
    console.print(f"admin web view:        [bold]{pool.url}/admin[/]   (admin token: {demo.admin_token})")
    console.print(f"pool directory:        {plain(pool_dir)}")


def _ask(pool: LocalPool, api_key: str, question: str, security: ChannelSecurity) -> None:
    from coop.client import Client
    from coop.node.client import node_info

    console.print(f"\n[bold]Q:[/] {plain(question)}")
    result = Client(pool.url, api_key=api_key, timeout_s=300).chat(
        [{"role": "user", "content": question}], temperature=0, max_tokens=64
    )
    console.print(f"[bold]A:[/] {plain(result.text)}")
    console.print(f"({result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} completion tokens)\n")
    route = Table(title="route and work per node")
    for column in ("node", "blocks", "endpoint", "steps run", "pushed on", "returned"):
        route.add_column(column)
    for hop in result.route:
        info = node_info(hop.endpoint, security, institution=hop.institution, node_id=hop.node_id)
        route.add_row(
            plain(hop.node_id),
            f"{hop.start}:{hop.end}",
            plain(hop.endpoint),
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
