"""`coop status`: the live swarm as nodes announce it in the DHT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from coop.cli.console import console, plain
from coop.cli.options import MemberOption, PeersOption


def swarm_status(
    model: Annotated[Path, typer.Option("--model", help="a prepared model directory (names the model)")],
    initial_peers: PeersOption = None,
    member: MemberOption = None,
) -> None:
    """The swarm as a table: which nodes serve which blocks, their throughput and free cache."""
    from coop.model.manifest import Manifest
    from coop.pool.membership import Membership
    from coop.swarm.announcement import announcement_validator
    from coop.swarm.directory import SwarmDirectory
    from coop.swarm.routing import coverage_of, missing_blocks
    from coop.swarm.validation import pool_record_validator

    manifest = Manifest.load(model)
    membership = Membership.load(member)
    directory = SwarmDirectory.start(initial_peers or [], validator=pool_record_validator(membership))
    try:
        nodes = directory.list_nodes(membership.pool_id, manifest.content_hash, announcement_validator(membership))
    finally:
        directory.shutdown()
    n = manifest.num_blocks
    table = Table(title=plain(f"{manifest.name}: {len(nodes)} nodes, {n} blocks"))
    for column in ("node", "institution", "blocks", f"coverage 0..{n - 1}", "tokens/s", "free cache", "endpoint"):
        table.add_column(column)
    for node in nodes:
        bar = "".join("█" if node.start <= i < node.end else "·" for i in range(n))
        table.add_row(
            plain(node.node_id),
            plain(node.institution),
            f"{node.start}:{node.end}",
            bar,
            f"{node.throughput_tps:.1f}",
            f"{node.free_cache_bytes / 2**20:.0f} MiB",
            plain(node.endpoint),
        )
    console.print(table)
    counts = coverage_of(nodes, n)
    console.print("replicas per block: " + " ".join(str(c) for c in counts))
    gaps = missing_blocks(nodes, n)
    if gaps:
        console.print("[red]missing blocks:[/] " + ", ".join(f"{a}:{b}" for a, b in gaps))
    else:
        console.print("[green]every block is served[/]")
