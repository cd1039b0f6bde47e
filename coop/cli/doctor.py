"""`coop node doctor`: the checklist of coop.node.doctor, printed one line per check with its fix."""

from __future__ import annotations

import asyncio

import typer

from coop.cli.console import console, plain
from coop.cli.settings_options import GivenSettings, settings_flags
from coop.config import NodeSettings

_COLORS = {"OK": "green", "WARN": "yellow", "FAIL": "red"}


@settings_flags(NodeSettings)
def node_doctor(given: GivenSettings) -> None:
    """Check that a node would serve: bundle, model files, memory, port, DHT, revocation, reachability, clock.

    Takes the options of `coop node start` (a node id left empty is a throwaway doctor-… id). Exits with
    status 1 if any check fails; every failure comes with what to do about it.
    """
    from coop.node.doctor import run_doctor

    settings = given.resolve(NodeSettings).settings
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
