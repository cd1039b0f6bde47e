"""`coop pool init`: the pool administrator creates a pool.

Secrets (the admin token, API keys) are printed exactly once, when they are created, on stdout and
nowhere else; private keys and the ledger's URL are never printed (they go into 0600 files only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coop.cli.console import console, plain, quoted

pool_app = typer.Typer(no_args_is_help=True, help="Create a pool (run by the pool administrator).")


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
    ledger_url: Annotated[
        str | None,
        typer.Option("--ledger-url", help="database URL of the pool ledger, kept 0600 in <pool>/ledger.url"),
    ] = None,
) -> None:
    """Create a pool: CA key and certificate, admin token, empty member and key registries."""
    from coop.ledger.database import safe_url, write_ledger_url
    from coop.pool.files import check_text
    from coop.pool.registry import ADMIN_TOKEN_FILE, create_pool

    if ledger_url is not None:
        check_text("ledger URL", ledger_url)
    info = create_pool(directory, name, bootstrap=bootstrap or [])
    console.print(f"created pool {quoted(info.name)} (id {info.pool_id}) in {plain(directory)}")
    if ledger_url is not None:
        path = write_ledger_url(directory, ledger_url)
        console.print(f"ledger: {plain(safe_url(ledger_url))}, kept in {plain(path)} (mode 0600, never in bundles)")
    console.print(f"admin token (shown only this once; also in {plain(directory / ADMIN_TOKEN_FILE)}, mode 0600):")
    typer.echo(f"  {info.admin_token}")
    console.print(f"next: coop member add INSTITUTION --pool {plain(directory)}")
