"""`coop coordinator start|config`: admission, routing and the OpenAI-compatible API for a pool."""

from __future__ import annotations

import asyncio

import typer

from coop.cli.log_format import LogFormat, LogFormatOption, configure_logging
from coop.cli.settings_options import GivenSettings, settings_flags
from coop.cli.settings_view import log_effective, settings_lines
from coop.config import CoordinatorSettings
from coop.startup import pause_collection, resume_collection, share_tensors_by_descriptor

coordinator_app = typer.Typer(no_args_is_help=True, help="Run a coordinator (routing + OpenAI-compatible API).")


@coordinator_app.command("start")
@settings_flags(CoordinatorSettings)
def coordinator_start(given: GivenSettings, log_format: LogFormatOption = LogFormat.text) -> None:
    """Serve the OpenAI-compatible API, routing every request through the swarm."""
    configure_logging(log_format)
    pause_collection()  # for its imports (see coop.startup)
    from coop.coordinator.process import Coordinator

    resume_collection()
    share_tensors_by_descriptor()
    resolved = given.resolve(CoordinatorSettings)
    log_effective(resolved)
    asyncio.run(Coordinator.serve(resolved.settings))


@coordinator_app.command("config")
@settings_flags(CoordinatorSettings)
def coordinator_config(given: GivenSettings, log_format: LogFormatOption = LogFormat.text) -> None:
    """Print the settings `coop coordinator start` would run with, and where each came from; starts nothing."""
    for line in settings_lines(given.resolve(CoordinatorSettings)):
        typer.echo(line)
