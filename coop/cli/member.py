"""`coop member add|list|revoke` and `coop member key create|revoke`: the pool administrator's members.

Secrets (API keys) are printed exactly once, when they are created, on stdout and nowhere else;
private keys are never printed (they go into 0600 files only).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from coop.cli.console import console, plain, quoted
from coop.cli.options import PoolOption

member_app = typer.Typer(no_args_is_help=True, help="Admit, list and revoke member institutions of a pool.")
member_key_app = typer.Typer(no_args_is_help=True, help="API keys a member institution spends with.")
member_app.add_typer(member_key_app, name="key")

InstitutionArgument = Annotated[str, typer.Argument(help="the member institution's name (1-64 characters)")]


@member_app.command("add")
def member_add(
    institution: InstitutionArgument,
    pool: PoolOption,
    coordinator: Annotated[
        bool, typer.Option("--coordinator", help="issue a pool coordinator's bundle instead of a member's")
    ] = False,
    max_nodes: Annotated[
        int | None,
        typer.Option("--max-nodes", help="how many nodes per model the member may announce [default: 8]"),
    ] = None,
) -> None:
    """Admit an institution: issue it a certificate signed by the pool CA, in a bundle file.

    A member's bundle runs nodes (each node makes its own certificate from it, up to --max-nodes per
    model); a coordinator's bundle (--coordinator) runs a pool coordinator, the only kind that opens
    sessions and books receipts.
    """
    from coop.pool.ca import DEFAULT_MAX_NODES, ROLE_COORDINATOR, ROLE_MEMBER
    from coop.pool.registry import add_member

    role = ROLE_COORDINATOR if coordinator else ROLE_MEMBER
    bundle = add_member(pool, institution, role=role, max_nodes=DEFAULT_MAX_NODES if max_nodes is None else max_nodes)
    console.print(f"admitted {quoted(institution)} as a {role}; its bundle is {plain(bundle)}")
    console.print(
        "The bundle holds the member's private key: send it to the member over a secure channel, never by plain e-mail."
    )
    console.print(f"next: coop member key create {quoted(institution)} --pool {plain(pool)}")


@member_app.command("list")
def member_list(pool: PoolOption) -> None:
    """List every member ever admitted, with certificate serial, expiry and status."""
    from coop.pool.registry import list_members

    members = list_members(pool)
    if not members:
        console.print(f"no members yet; add one with `coop member add INSTITUTION --pool {plain(pool)}`")
        return
    table = Table()
    for column in ("institution", "serial", "expires", "status"):
        table.add_column(column)
    for member in members:
        table.add_row(
            plain(member.institution),
            member.serial,
            f"{member.not_after:%Y-%m-%d}",
            "[red]revoked[/]" if member.revoked else "[green]active[/]",
        )
    console.print(table)


@member_app.command("revoke")
def member_revoke(
    institution: InstitutionArgument,
    pool: PoolOption,
    initial_peers: Annotated[
        list[str] | None,
        typer.Option("--initial-peers", help="DHT peers to publish the list to (default: the pool's bootstrap)"),
    ] = None,
) -> None:
    """Revoke an institution's certificate and API keys, and publish the signed list in the DHT."""
    from coop.pool.registry import PoolInfo, revoke_member
    from coop.swarm.directory import SwarmDirectory
    from coop.swarm.revocations import REVOCATION_POLL_S, publish_revocations

    revocations = revoke_member(pool, institution)
    peers = list(initial_peers or PoolInfo.load(pool).bootstrap)
    if peers:
        with SwarmDirectory.start(peers) as directory:
            publish_revocations(directory, revocations)
    where = (
        f"published to the DHT; every node and coordinator applies it within {REVOCATION_POLL_S:.0f} s"
        if peers
        else "no DHT peers given (--initial-peers), so it was not published yet"
    )
    console.print(f"revoked {quoted(institution)} ({len(revocations.revoked)} revoked in all); {where}")


@member_key_app.command("create")
def member_key_create(institution: InstitutionArgument, pool: PoolOption) -> None:
    """Create an API key for a member; it is shown once and only its hash is stored."""
    from coop.pool.registry import create_api_key

    key = create_api_key(pool, institution)
    console.print(f"API key for {quoted(institution)} (shown only this once; store it now):")
    typer.echo(f"  {key}")


@member_key_app.command("revoke")
def member_key_revoke(institution: InstitutionArgument, pool: PoolOption) -> None:
    """Revoke every API key of a member (its certificate stays valid)."""
    from coop.pool.registry import revoke_api_keys

    count = revoke_api_keys(pool, institution)
    console.print(f"revoked {count} API key(s) of {quoted(institution)}")
