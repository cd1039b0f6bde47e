"""`coop node quarantine lift`: the pool admin puts a node that spot checks quarantined back into routes.

Quarantines live in the ledger's audit trail (coop/swarm/trust.py), so the lift is one more audit
event there; every coordinator of the pool reads it back within seconds and routes to the node again.
"""

from __future__ import annotations

from typing import Annotated

import typer

from coop.cli.console import console, quoted
from coop.cli.ledger import ADMIN_ACTOR, UrlOption, _open
from coop.cli.options import PoolOption
from coop.errors import InvalidInput

quarantine_app = typer.Typer(no_args_is_help=True, help="Nodes that spot checks caught computing wrong.")


@quarantine_app.command("lift")
def lift(
    node_id: Annotated[str, typer.Argument(help="the quarantined node's id")],
    pool: PoolOption,
    institution: Annotated[
        str | None, typer.Option(help="the node's institution (needed when several quarantined nodes share the id)")
    ] = None,
    reason: Annotated[str, typer.Option(help="why, for the audit trail")] = "",
    ledger_url: UrlOption = None,
) -> None:
    """Put a quarantined node back into routes (its trust record keeps the failed check)."""
    from coop.swarm.trust import LIFTED, trust_from_ledger

    ledger = _open(pool, ledger_url)
    quarantined = [
        node
        for node, record in trust_from_ledger(ledger).items()
        if record.quarantined and node.node_id == node_id and institution in (None, node.institution)
    ]
    if not quarantined:
        raise InvalidInput(f"node {node_id!r} is not quarantined; `coop status --pool {pool}` lists the nodes' records")
    if len(quarantined) > 1:
        named = ", ".join(sorted(node.institution for node in quarantined))
        raise InvalidInput(f"nodes {node_id!r} of {named} are quarantined: name one with --institution")
    [node] = quarantined
    ledger.record(ADMIN_ACTOR, LIFTED, str(node), reason or "lifted by the pool admin")
    console.print(f"lifted the quarantine of node {quoted(str(node))}; coordinators route to it again within seconds")
