"""`coop status`: the live swarm as nodes announce it in the DHT."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from coop.cli.console import console, plain
from coop.cli.ledger import UrlOption
from coop.cli.options import MemberOption, PeersOption

if TYPE_CHECKING:
    from coop.swarm.node_key import NodeKey
    from coop.swarm.trust import TrustRecord


def swarm_status(
    model: Annotated[Path, typer.Option("--model", help="a prepared model directory (names the model)")],
    initial_peers: PeersOption = None,
    member: MemberOption = None,
    pool: Annotated[
        Path | None, typer.Option("--pool", help="the pool directory: adds each node's spot-check record")
    ] = None,
    ledger_url: UrlOption = None,
) -> None:
    """The swarm as a table: which nodes serve which blocks, their throughput and free cache."""
    from coop.model.manifest import Manifest
    from coop.pool.membership import Membership
    from coop.swarm.announcement import announcement_validator
    from coop.swarm.directory import SwarmDirectory
    from coop.swarm.node_key import key_of
    from coop.swarm.routing import coverage_of, missing_blocks
    from coop.swarm.validation import pool_record_validator

    manifest = Manifest.load(model)
    membership = Membership.load(member)
    directory = SwarmDirectory.start(initial_peers or [], validator=pool_record_validator(membership))
    try:
        nodes = directory.list_nodes(membership.pool_id, manifest.content_hash, announcement_validator(membership))
    finally:
        directory.shutdown()
    trust = _trust(pool, ledger_url) if pool is not None else None
    n = manifest.num_blocks
    table = Table(title=plain(f"{manifest.name}: {len(nodes)} nodes, {n} blocks"))
    columns = ("node", "institution", "blocks", "state", f"coverage 0..{n - 1}", "tokens/s", "free cache", "endpoint")
    for column in columns:
        table.add_column(column)
    if trust is not None:
        table.add_column("checks passed / failed")
    for node in nodes:
        bar = "".join("█" if node.start <= i < node.end else "·" for i in range(n))
        record = trust.get(key_of(node)) if trust is not None else None
        checks = [] if trust is None else [_checks(record)]
        table.add_row(
            plain(node.node_id),
            plain(node.institution),
            f"{node.start}:{node.end}",
            _STATE_STYLE.get(node.state, plain(node.state)),
            bar,
            f"{node.throughput_tps:.1f}",
            f"{node.free_cache_bytes / 2**20:.0f} MiB",
            plain(node.endpoint),
            *checks,
        )
    console.print(table)
    counts = coverage_of(nodes, n)
    console.print("replicas per block: " + " ".join(str(c) for c in counts))
    gaps = missing_blocks(nodes, n)
    if gaps:
        console.print("[red]missing blocks:[/] " + ", ".join(f"{a}:{b}" for a, b in gaps))
    else:
        console.print("[green]every block is served[/]")


_STATE_STYLE = {"serving": "[green]serving[/]", "paused": "[yellow]paused[/]", "draining": "[yellow]draining[/]"}


def _trust(pool: Path, ledger_url: str | None) -> dict[NodeKey, TrustRecord]:
    from coop.cli.ledger import _open
    from coop.swarm.trust import trust_from_ledger

    return trust_from_ledger(_open(pool, ledger_url))


def _checks(record: TrustRecord | None) -> str:
    if record is None:
        return "unchecked"
    quarantined = " [red]quarantined[/]" if record.quarantined else ""
    return f"{record.passed} / {record.failed}{quarantined}"
