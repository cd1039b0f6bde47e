"""`coop coordinator start`: admission, routing and the OpenAI-compatible API for a pool."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from coop.cli.log_format import LogFormat, LogFormatOption, configure_logging
from coop.cli.options import MemberOption, PeersOption
from coop.startup import pause_collection, resume_collection, share_tensors_by_descriptor

coordinator_app = typer.Typer(no_args_is_help=True, help="Run a coordinator (routing + OpenAI-compatible API).")


@coordinator_app.command("start")
def coordinator_start(
    models: Annotated[
        list[Path],
        typer.Option(
            "--model",
            help="a prepared model directory (repeatable: one coordinator serves them all; the first is the default)",
        ),
    ],
    port: Annotated[int, typer.Option(envvar="COOP_COORDINATOR_PORT")] = 8000,
    host: Annotated[str, typer.Option(envvar="COOP_COORDINATOR_HOST")] = "127.0.0.1",
    initial_peers: PeersOption = None,
    device: Annotated[str, typer.Option()] = "auto",
    max_context: Annotated[int, typer.Option("--max-context")] = 2048,
    member: MemberOption = None,
    api_keys: Annotated[
        Path | None, typer.Option("--api-keys", help="the pool's api_keys.json; without it anyone may call the API")
    ] = None,
    ledger_url: Annotated[
        str | None,
        typer.Option(
            "--ledger-url",
            envvar="COOP_LEDGER_URL",
            help="e.g. postgresql+psycopg://coop:PW@db/coop (default: <pool-dir>/ledger.url, else SQLite; see README)",
        ),
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
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Serve the OpenAI-compatible API, routing every request through the swarm."""
    configure_logging(log_format)
    pause_collection()  # for its imports (see coop.startup)
    from coop.config import CoordinatorSettings
    from coop.coordinator.process import Coordinator

    resume_collection()
    share_tensors_by_descriptor()

    settings = CoordinatorSettings(
        model_dir=models[0],
        extra_model_dirs=tuple(models[1:]),
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
    asyncio.run(Coordinator.serve(settings))
