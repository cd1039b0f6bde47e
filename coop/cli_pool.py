"""`coop pool ...` and `coop member ...`: the pool administrator's commands.

Secrets (the admin token, API keys) are printed exactly once, when they are created, on stdout and
nowhere else; private keys are never printed (they go into 0600 files only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coop.errors import CoopError

pool_app = typer.Typer(no_args_is_help=True, help="Create a pool (run by the pool administrator).")
member_app = typer.Typer(no_args_is_help=True, help="Admit, list and revoke member institutions of a pool.")
member_key_app = typer.Typer(no_args_is_help=True, help="API keys a member institution spends with.")
member_app.add_typer(member_key_app, name="key")

PoolOption = Annotated[Path, typer.Option("--pool", help="the pool directory made by `coop pool init`")]
InstitutionArgument = Annotated[str, typer.Argument(help="the member institution's name (1-64 characters)")]

console = Console(soft_wrap=True, highlight=False)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def _fail(exc: CoopError) -> NoReturn:
    err_console.print(f"[red]error:[/] {escape(str(exc))}")
    raise typer.Exit(code=1)


def _q(text: str) -> str:
    """Quote a user-supplied name for rich output (so '[' in a name is not taken for markup)."""
    return escape(repr(text))


@pool_app.callback()
def _pool() -> None:
    """Create a pool (run by the pool administrator)."""


@pool_app.command("init")
def pool_init(
    directory: Annotated[Path, typer.Argument(help="where to keep the pool's CA, registry and secrets")],
    name: Annotated[str, typer.Option("--name", help="a human-readable pool name")],
    bootstrap: Annotated[
        list[str] | None, typer.Option("--bootstrap", help="DHT multiaddr members join through (repeatable)")
    ] = None,
    ledger_url: Annotated[str | None, typer.Option("--ledger-url", help="database URL of the pool ledger")] = None,
) -> None:
    """Create a pool: CA key and certificate, admin token, empty member and key registries."""
    from coop.identity import ADMIN_TOKEN_FILE, create_pool

    try:
        info = create_pool(directory, name, bootstrap=bootstrap or [], ledger_url=ledger_url)
    except CoopError as exc:
        _fail(exc)
    console.print(f"created pool {_q(info.name)} (id {info.pool_id}) in {escape(str(directory))}")
    console.print(
        f"admin token (shown only this once; also in {escape(str(directory / ADMIN_TOKEN_FILE))}, mode 0600):"
    )
    typer.echo(f"  {info.admin_token}")
    console.print(f"next: coop member add INSTITUTION --pool {escape(str(directory))}")


@member_app.command("add")
def member_add(institution: InstitutionArgument, pool: PoolOption) -> None:
    """Admit an institution: issue it a certificate signed by the pool CA, in a bundle file."""
    from coop.identity import add_member

    try:
        bundle = add_member(pool, institution)
    except CoopError as exc:
        _fail(exc)
    console.print(f"admitted {_q(institution)}; its member bundle is {escape(str(bundle))}")
    console.print(
        "The bundle holds the member's private key: send it to the member over a secure channel, never by plain e-mail."
    )
    console.print(f"next: coop member key create {_q(institution)} --pool {escape(str(pool))}")


@member_app.command("list")
def member_list(pool: PoolOption) -> None:
    """List every member ever admitted, with certificate serial, expiry and status."""
    from coop.identity import list_members

    try:
        members = list_members(pool)
    except CoopError as exc:
        _fail(exc)
    if not members:
        console.print(f"no members yet; add one with `coop member add INSTITUTION --pool {escape(str(pool))}`")
        return
    table = Table()
    for column in ("institution", "serial", "expires", "status"):
        table.add_column(column)
    for member in members:
        table.add_row(
            escape(member.institution),
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
    from coop.identity import PoolInfo, revoke_member
    from coop.membership import REVOCATION_POLL_S, publish_revocations
    from coop.node.directory import SwarmDirectory

    try:
        revocations = revoke_member(pool, institution)
        peers = list(initial_peers or PoolInfo.load(pool).bootstrap)
        if peers:
            with SwarmDirectory.start(peers) as directory:
                publish_revocations(directory, revocations)
    except CoopError as exc:
        _fail(exc)
    where = (
        f"published to the DHT; every node and coordinator applies it within {REVOCATION_POLL_S:.0f} s"
        if peers
        else "no DHT peers given (--initial-peers), so it was not published yet"
    )
    console.print(f"revoked {_q(institution)} ({len(revocations.revoked)} revoked in all); {where}")


@member_key_app.command("create")
def member_key_create(institution: InstitutionArgument, pool: PoolOption) -> None:
    """Create an API key for a member; it is shown once and only its hash is stored."""
    from coop.identity import create_api_key

    try:
        key = create_api_key(pool, institution)
    except CoopError as exc:
        _fail(exc)
    console.print(f"API key for {_q(institution)} (shown only this once; store it now):")
    typer.echo(f"  {key}")


@member_key_app.command("revoke")
def member_key_revoke(institution: InstitutionArgument, pool: PoolOption) -> None:
    """Revoke every API key of a member (its certificate stays valid)."""
    from coop.identity import revoke_api_keys

    try:
        count = revoke_api_keys(pool, institution)
    except CoopError as exc:
        _fail(exc)
    console.print(f"revoked {count} API key(s) of {_q(institution)}")
