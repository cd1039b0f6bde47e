"""The `coop` command line: parses flags, builds settings, calls components. Nothing else."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from coop.cli_ledger import ledger_app
from coop.cli_pool import member_app, pool_app
from coop.errors import CoopError

app = typer.Typer(no_args_is_help=True, help="Coop: a cooperative compute pool for large language models.")
model_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect model stores.")
app.add_typer(model_app, name="model")
node_app = typer.Typer(no_args_is_help=True, help="Run and inspect node daemons.")
app.add_typer(node_app, name="node")
dht_app = typer.Typer(no_args_is_help=True, help="Run a DHT bootstrap peer.")
app.add_typer(dht_app, name="dht")
coordinator_app = typer.Typer(no_args_is_help=True, help="Run a coordinator (routing + OpenAI-compatible API).")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(pool_app, name="pool")
app.add_typer(member_app, name="member")
app.add_typer(ledger_app, name="ledger")

MemberOption = Annotated[
    Path | None, typer.Option("--member", help="this institution's member bundle (mutual TLS, signed records)")
]
PeersOption = Annotated[
    list[str] | None, typer.Option("--initial-peers", help="DHT multiaddrs of any pool member (repeatable)")
]

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def _fail(exc: CoopError) -> None:
    err_console.print(f"[red]error:[/] {exc}")
    raise typer.Exit(code=1)


def parse_spans(text: str) -> list[tuple[int, int]]:
    """'0:10,10:20' -> [(0, 10), (10, 20)]"""
    spans = []
    for part in text.split(","):
        try:
            start, end = (int(x) for x in part.split(":"))
        except ValueError as exc:
            raise typer.BadParameter(f"span {part!r} is not START:END") from exc
        spans.append((start, end))
    return spans


@model_app.command("prepare")
def model_prepare(
    src: Annotated[str, typer.Argument(help="HF model directory, .gguf file, or 'smollm2-demo'")],
    out: Annotated[Path, typer.Option("--out", help="directory to write the model store to")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
) -> None:
    """Convert a model into per-block files that nodes load one span at a time."""
    from coop.model.prepare import prepare

    try:
        prepare(src, out, dtype=dtype)
    except CoopError as exc:
        _fail(exc)


@model_app.command("info")
def model_info(
    model_dir: Annotated[Path, typer.Argument(help="a prepared model directory")],
    verify: Annotated[bool, typer.Option("--verify", help="check every file's sha256")] = False,
) -> None:
    """Show a prepared model's manifest."""
    from coop.model.files import verify_all
    from coop.model.manifest import Manifest

    try:
        manifest = Manifest.load(model_dir)
        table = Table(title=f"{manifest.name} ({model_dir})", show_header=False)
        for key, value in [
            ("architecture", manifest.architecture),
            ("model type", manifest.model_type),
            ("dtype", manifest.dtype),
            ("blocks", str(manifest.num_blocks)),
            ("hidden size", str(manifest.hidden_size)),
            ("vocab size", str(manifest.vocab_size)),
            ("block parameters", f"{sum(b.param_count for b in manifest.blocks):,}"),
            ("client parameters", f"{manifest.client_param_count:,}"),
            ("GFLOPs per token", f"{manifest.total_flops_per_token / 1e9:.3f}"),
            ("tokenizer", "yes" if manifest.has_tokenizer else "no"),
            ("content hash", manifest.content_hash),
            ("source", f"{manifest.source.kind}: {manifest.source.path}"),
        ]:
            table.add_row(key, value)
        console.print(table)
        if verify:
            verify_all(model_dir, manifest)
            console.print(f"[green]verified[/] {len(manifest.files)} files")
    except CoopError as exc:
        _fail(exc)


@app.command("generate")
def generate(
    prompt: Annotated[str, typer.Argument(help="the user's message")],
    model: Annotated[Path, typer.Option("--model", help="a prepared model directory")],
    spans: Annotated[str, typer.Option(help="spans to chain in this process, e.g. 0:10,10:20,20:30")] = "",
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 64,
    temperature: Annotated[float, typer.Option()] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "auto",
) -> None:
    """Generate locally through a chain of spans: the reference path the swarm must match."""
    from coop.coordinator.generation import LocalChain, check_spans_tile, collect_tokens
    from coop.coordinator.sampling import SamplingParams
    from coop.model.client_part import ClientPart
    from coop.model.manifest import Manifest
    from coop.node.engine import SpanEngine

    try:
        manifest = Manifest.load(model)
        span_list = parse_spans(spans) if spans else [(0, manifest.num_blocks)]
        check_spans_tile(span_list, manifest.num_blocks)  # before loading any weights
        client = ClientPart.load(model, device=device)
        engines = [SpanEngine.load(model, a, b, device=device) for a, b in span_list]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        prompt_ids = client.encode_chat([{"role": "user", "content": prompt}])
        chain = LocalChain(engines, max_length=len(prompt_ids) + max_tokens)
        tokens = asyncio.run(collect_tokens(client, chain, prompt_ids, params))
        console.print(client.decode(tokens))
    except CoopError as exc:
        _fail(exc)


@dht_app.command("start")
def dht_start(
    initial_peers: PeersOption = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 0,
) -> None:
    """Start a DHT peer that helps nodes and coordinators find each other."""
    from coop.node.daemon import run_dht

    try:
        asyncio.run(run_dht(initial_peers or [], host, port))
    except CoopError as exc:
        _fail(exc)


@node_app.command("start")
def node_start(
    model: Annotated[Path, typer.Option("--model", help="a prepared model directory")],
    blocks: Annotated[str, typer.Option(help="START:END, or auto to fill the least-served blocks")] = "auto",
    port: Annotated[int, typer.Option(help="gRPC port (0 = any free port)")] = 0,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    initial_peers: PeersOption = None,
    max_blocks: Annotated[int, typer.Option("--max-blocks", help="with --blocks auto: how many")] = 0,
    institution: Annotated[str, typer.Option()] = "local",
    node_id: Annotated[str, typer.Option("--node-id")] = "",
    device: Annotated[str, typer.Option()] = "auto",
    cache_budget_mb: Annotated[int, typer.Option("--cache-budget-mb")] = 2048,
    member: MemberOption = None,
    outbox: Annotated[
        Path | None, typer.Option("--outbox", help="receipts wait here until booked (default: <member>.outbox.db)")
    ] = None,
) -> None:
    """Serve a span of blocks to the pool until SIGTERM or Ctrl-C."""
    from coop.config import NodeSettings
    from coop.node.daemon import run_node

    try:
        settings = NodeSettings(
            model_dir=model,
            blocks=blocks,
            port=port,
            host=host,
            initial_peers=tuple(initial_peers or ()),
            max_blocks=max_blocks,
            institution=institution,
            node_id=node_id,
            device=device,
            cache_budget_bytes=cache_budget_mb << 20,
            member_bundle=member,
            outbox_path=outbox,
        )
        asyncio.run(run_node(settings))
    except CoopError as exc:
        _fail(exc)


@node_app.command("status")
def node_status(
    endpoint: Annotated[str, typer.Argument(help="host:port of the node's gRPC server")],
    member: MemberOption = None,
) -> None:
    """Show what a running node serves and how much work it did."""
    from coop.membership import Membership
    from coop.node.client import node_info

    try:
        info = node_info(endpoint, Membership.load(member).channel_security())
    except CoopError as exc:
        _fail(exc)
        return
    table = Table(title=f"node {info.node_id} at {endpoint}", show_header=False)
    for key, value in [
        ("blocks", f"{info.start}:{info.end}"),
        ("model hash", info.model_hash[:16]),
        ("throughput", f"{info.throughput_tps:.1f} tokens/s"),
        ("free cache", f"{info.free_cache_bytes / 2**20:.0f} MiB"),
        ("active sessions", str(info.active_sessions)),
        ("steps run", str(info.counters.steps_run)),
        ("pushes sent", str(info.counters.pushes_sent)),
        ("results sent", str(info.counters.results_sent)),
    ]:
        table.add_row(key, value)
    console.print(table)


@coordinator_app.command("start")
def coordinator_start(
    model: Annotated[Path, typer.Option("--model", help="a prepared model directory")],
    port: Annotated[int, typer.Option()] = 8000,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    initial_peers: PeersOption = None,
    device: Annotated[str, typer.Option()] = "auto",
    max_context: Annotated[int, typer.Option("--max-context")] = 2048,
    member: MemberOption = None,
    api_keys: Annotated[
        Path | None, typer.Option("--api-keys", help="the pool's api_keys.json; without it anyone may call the API")
    ] = None,
    ledger_url: Annotated[
        str | None,
        typer.Option("--ledger-url", help="e.g. postgresql+psycopg://coop@db/coop (default: SQLite, see README)"),
    ] = None,
    pool_dir: Annotated[
        Path | None, typer.Option("--pool-dir", help="the pool directory: enables the admin view, holds the ledger")
    ] = None,
    max_active_sessions: Annotated[
        int, typer.Option("--max-active-sessions", help="beyond this, requests wait in fair-share order")
    ] = 32,
    receipt_interval: Annotated[
        float, typer.Option("--receipt-interval", help="seconds between rounds of receipt collection")
    ] = 2.0,
) -> None:
    """Serve the OpenAI-compatible API, routing every request through the swarm."""
    from coop.config import CoordinatorSettings
    from coop.coordinator.service import run_coordinator

    try:
        settings = CoordinatorSettings(
            model_dir=model,
            port=port,
            host=host,
            initial_peers=tuple(initial_peers or ()),
            device=device,
            max_context=max_context,
            member_bundle=member,
            api_keys_file=api_keys,
            ledger_url=ledger_url,
            pool_dir=pool_dir,
            max_active_sessions=max_active_sessions,
            receipt_interval_s=receipt_interval,
        )
        asyncio.run(run_coordinator(settings))
    except CoopError as exc:
        _fail(exc)


@app.command("status")
def swarm_status(
    model: Annotated[Path, typer.Option("--model", help="a prepared model directory (names the model)")],
    initial_peers: PeersOption = None,
    member: MemberOption = None,
) -> None:
    """The swarm as a table: which nodes serve which blocks, their throughput and free cache."""
    from coop.coordinator.routing import coverage_of, missing_blocks
    from coop.membership import Membership
    from coop.model.manifest import Manifest
    from coop.node.directory import SwarmDirectory

    try:
        manifest = Manifest.load(model)
        membership = Membership.load(member)
        directory = SwarmDirectory.start(initial_peers or [])
        try:
            nodes = directory.list_nodes(membership.pool_id, manifest.content_hash, membership.announcement_validator())
        finally:
            directory.shutdown()
    except CoopError as exc:
        _fail(exc)
        return
    n = manifest.num_blocks
    table = Table(title=f"{manifest.name}: {len(nodes)} nodes, {n} blocks")
    for column in ("node", "institution", "blocks", f"coverage 0..{n - 1}", "tokens/s", "free cache", "endpoint"):
        table.add_column(column)
    for node in nodes:
        bar = "".join("█" if node.start <= i < node.end else "·" for i in range(n))
        table.add_row(
            node.node_id,
            node.institution,
            f"{node.start}:{node.end}",
            bar,
            f"{node.throughput_tps:.1f}",
            f"{node.free_cache_bytes / 2**20:.0f} MiB",
            node.endpoint,
        )
    console.print(table)
    counts = coverage_of(nodes, n)
    console.print("replicas per block: " + " ".join(str(c) for c in counts))
    gaps = missing_blocks(nodes, n)
    if gaps:
        console.print("[red]missing blocks:[/] " + ", ".join(f"{a}:{b}" for a, b in gaps))
    else:
        console.print("[green]every block is served[/]")


@app.command("demo")
def demo(
    model_dir: Annotated[Path, typer.Option("--model-dir", help="where the demo model is prepared (cached)")] = Path(
        ".cache/smollm2-demo"
    ),
    port: Annotated[int, typer.Option(help="HTTP port of the coordinator (0 = any free port)")] = 8000,
    question: Annotated[str, typer.Option()] = "What is the capital of France?",
    once: Annotated[bool, typer.Option("--once", help="exit after the answer")] = False,
) -> None:
    """A local pool in one command: DHT, three nodes, a coordinator, and one chat question."""
    from coop.demo import run_demo

    try:
        run_demo(model_dir, port=port, question=question, once=once, console=console)
    except CoopError as exc:
        _fail(exc)


if __name__ == "__main__":
    app()
