"""The `coop` command line: parses flags, builds settings, calls components. Nothing else.

One entry (`app`, the `coop` script and `python -m coop.cli`) and one place where a `CoopError`
becomes what a user sees: `error: <message>` on stderr and exit status 1. Commands just let
`CoopError` propagate; usage errors stay Click's (exit status 2).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from coop import __version__
from coop.cli import coordinator, demo, doctor, ledger, member, model, node, pool, swarm
from coop.cli.console import console, err_console, plain
from coop.errors import CoopError

__all__ = ["app"]


class CoopGroup(TyperGroup):
    """The root command group: every subcommand runs inside its `invoke`, so this is the one handler.

    It sits in Click's command tree rather than around `app()`, so `typer.testing.CliRunner` sees
    exactly what the installed script does.
    """

    def invoke(self, ctx: Any) -> Any:  # Typer's vendored click.Context has no public name to annotate with
        try:
            return super().invoke(ctx)
        except CoopError as exc:
            err_console.print(f"[red]error:[/] {plain(exc)}")
            raise typer.Exit(code=1) from exc


app = typer.Typer(
    cls=CoopGroup, no_args_is_help=True, help="Coop: a cooperative compute pool for large language models."
)


def _print_version(asked: bool) -> None:
    if asked:
        console.print(f"coop {__version__}")
        raise typer.Exit()


def _quiet_torchao() -> None:
    """transformers imports torchao (for quantized models) whenever it is installed, and torchao then warns,
    on every command's stderr, about each CUDA-only kernel library it cannot load and an enum it registers."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Options of `coop` itself, before any command."""
    _quiet_torchao()


app.add_typer(model.model_app, name="model")
app.add_typer(node.node_app, name="node")
node.node_app.command("doctor")(doctor.node_doctor)
app.add_typer(node.dht_app, name="dht")
app.add_typer(coordinator.coordinator_app, name="coordinator")
app.add_typer(pool.pool_app, name="pool")
app.add_typer(member.member_app, name="member")
app.add_typer(ledger.ledger_app, name="ledger")
app.command("generate")(model.generate)
app.command("status")(swarm.swarm_status)
app.command("demo")(demo.demo)
