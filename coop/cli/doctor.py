"""`coop node doctor`: the checklist of coop.node.doctor, printed one line per check with its fix."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from coop.cli.console import console, plain
from coop.cli.options import MemberOption, ModelOption, PeersOption

_COLORS = {"OK": "green", "WARN": "yellow", "FAIL": "red"}


def node_doctor(
    model: ModelOption,
    member: MemberOption = None,
    initial_peers: PeersOption = None,
    port: Annotated[int, typer.Option(help="the gRPC port the node will listen on")] = 0,
    host: Annotated[str, typer.Option(help="the address the node will listen on")] = "127.0.0.1",
    announce_host: Annotated[
        str,
        typer.Option(
            "--announce-host",
            envvar="COOP_NODE_ANNOUNCE_HOST",
            help="the address other members reach the node at (default: --host)",
        ),
    ] = "",
    blocks: Annotated[str, typer.Option(help="START:END, or auto")] = "auto",
    node_id: Annotated[str, typer.Option("--node-id", help="default: a throwaway doctor-… id")] = "",
    device: Annotated[str, typer.Option()] = "auto",
    cache_budget_mb: Annotated[int, typer.Option("--cache-budget-mb")] = 2048,
) -> None:
    """Check that a node would serve: bundle, model files, memory, port, DHT, revocation, reachability, clock.

    Exits with status 1 if any check fails; every failure comes with what to do about it.
    """
    from coop.config import NodeSettings
    from coop.node.doctor import run_doctor

    settings = NodeSettings(
        model_dir=model,
        member_bundle=member,
        initial_peers=tuple(initial_peers or ()),
        port=port,
        host=host,
        blocks=blocks,
        node_id=node_id,
        device=device,
        cache_budget_bytes=cache_budget_mb << 20,
        announce_host=announce_host,
    )
    checks = asyncio.run(run_doctor(settings))
    for check in checks:
        color = _COLORS[check.status]
        console.print(f"[{color}]{check.status:<4}[/] {check.name:<10} {plain(check.detail)}")
        if check.fix:
            console.print(f"     {'':<10} fix: {plain(check.fix)}")
    failed = [check.name for check in checks if check.status == "FAIL"]
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed:[/] {', '.join(failed)}")
        raise typer.Exit(code=1)
    console.print("[green]all checks passed[/]: start the node with the same options (coop node start …)")
