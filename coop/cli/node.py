"""`coop node start|config|status|drain|pause|resume` and `coop dht start`: the processes that serve blocks and
hold the DHT, and what their owners do to them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from coop.cli.console import console, plain
from coop.cli.log_format import LogFormat, LogFormatOption, configure_logging
from coop.cli.options import MemberOption
from coop.cli.settings_options import GivenSettings, settings_flags
from coop.cli.settings_view import log_effective, settings_lines
from coop.cli.trust import quarantine_app
from coop.config import DhtSettings, NodeSettings
from coop.startup import pause_collection, share_tensors_by_descriptor

if TYPE_CHECKING:
    from coop.wire.generated import coop_pb2 as pb

node_app = typer.Typer(no_args_is_help=True, help="Run and inspect node daemons.")
dht_app = typer.Typer(no_args_is_help=True, help="Run a DHT bootstrap peer.")
node_app.add_typer(quarantine_app, name="quarantine")


@dht_app.command("start")
@settings_flags(DhtSettings)
def dht_start(given: GivenSettings, log_format: LogFormatOption = LogFormat.text) -> None:
    """Start a DHT peer that helps nodes and coordinators find each other."""
    configure_logging(log_format)
    from coop.node.daemon import run_dht
    from coop.pool.membership import Membership

    settings = given.resolve(DhtSettings).settings
    share_tensors_by_descriptor()
    membership = Membership.load(settings.member_bundle)
    asyncio.run(run_dht(list(settings.initial_peers), settings.host, settings.port, membership, settings.identity))


@node_app.command("start")
@settings_flags(NodeSettings)
def node_start(given: GivenSettings, log_format: LogFormatOption = LogFormat.text) -> None:
    """Serve a span of blocks to the pool until SIGTERM or Ctrl-C (the first drains, a second stops at once)."""
    configure_logging(log_format)
    pause_collection()  # resumed by the node once it serves: see coop.startup
    from coop.node.daemon import run_node

    resolved = given.resolve(NodeSettings)
    log_effective(resolved)
    load_torchao_only_if_quantized(resolved.settings)
    share_tensors_by_descriptor()
    asyncio.run(run_node(resolved.settings))


@node_app.command("config")
@settings_flags(NodeSettings)
def node_config(given: GivenSettings, log_format: LogFormatOption = LogFormat.text) -> None:
    """Print the settings `coop node start` would run with, and where each came from; starts nothing."""
    for line in settings_lines(given.resolve(NodeSettings)):
        typer.echo(line)


def load_torchao_only_if_quantized(settings: NodeSettings) -> None:
    """Keep torchao unloaded (`keep_torchao_unloaded`) unless one of the node's models has quantized blocks."""
    from coop.model.manifest import Manifest
    from coop.model.quantization import keep_torchao_unloaded

    if all(
        Manifest.load(directory).quantization == "none" for directory in (settings.model_dir, *settings.more_model_dirs)
    ):
        keep_torchao_unloaded()


@node_app.command("status")
def node_status(
    endpoint: Annotated[str, typer.Argument(help="host:port of the node's gRPC server")],
    member: MemberOption = None,
    node_id: Annotated[str, typer.Option("--node-id", help="in a pool: the node's id, which it must prove")] = "",
    institution: Annotated[
        str, typer.Option("--institution", help="in a pool: the node's institution (default: the bundle's)")
    ] = "",
) -> None:
    """Show what a running node serves and how much work it did."""
    from coop.node.client import node_info
    from coop.pool.membership import Membership

    if member is not None and not node_id:
        raise typer.BadParameter("in a pool, name the node with --node-id (see `coop swarm status`)")
    membership = Membership.load(member, node_id=f"status-{uuid.uuid4().hex[:8]}")
    security = membership.channel_security()
    info = node_info(endpoint, security, institution=institution or membership.institution, node_id=node_id)
    table = Table(title=plain(f"node {info.node_id} at {endpoint}"), show_header=False)
    for key, value in status_rows(info):
        table.add_row(key, value)
    console.print(table)


EndpointArgument = Annotated[
    str, typer.Argument(help="in a pool: host:port of the node's gRPC server; without a bundle: unused")
]
ControlNodeIdOption = Annotated[str, typer.Option("--node-id", help="the node's id")]
OwnedInstitutionOption = Annotated[
    str, typer.Option("--institution", help="in a pool: the node's institution (default: the bundle's)")
]
SocketOption = Annotated[
    Path | None,
    typer.Option("--socket", help="the node's control socket (default: the one `coop node start` made for --node-id)"),
]


def _control_command(action: str, doc: str) -> Callable[..., None]:
    """One `coop node drain|pause|resume` command: the same options, one Control action."""

    def command(
        node_id: ControlNodeIdOption,
        endpoint: EndpointArgument = "",
        member: MemberOption = None,
        institution: OwnedInstitutionOption = "",
        socket: SocketOption = None,
    ) -> None:
        _control(action, endpoint, member, node_id, institution, socket)

    command.__doc__ = doc
    return command


for _name, _doc in (
    ("drain", "Drain your node: it takes no new session, its sessions move to other routes, then it exits."),
    ("pause", "Pause your node: as drain, but it stays up, announced as paused, until `coop node resume`."),
    ("resume", "Resume a paused node (outside its serving hours it stays paused)."),
):
    node_app.command(_name)(_control_command(_name.upper(), _doc))


def _control(
    action: str, endpoint: str, member: Path | None, node_id: str, institution: str, socket: Path | None
) -> None:
    """In a pool: over TLS, as a node certificate of the bundle's institution; else on the control socket."""
    from coop.node.client import node_control
    from coop.node.drain import control_socket_path
    from coop.pool.membership import Membership
    from coop.wire.generated import coop_pb2 as pb

    code = pb.ControlRequest.Action.Value(action)
    if member is None:
        reply = node_control(f"unix:{socket or control_socket_path(node_id)}", code)
    else:
        if not endpoint:
            raise typer.BadParameter("in a pool, give the node's host:port (see `coop swarm status`)")
        membership = Membership.load(member, node_id=f"owner-{uuid.uuid4().hex[:8]}")
        security = membership.channel_security()
        owner = institution or membership.institution
        reply = node_control(endpoint, code, security, institution=owner, node_id=node_id)
    console.print(f"node {plain(node_id)}: {reply.state}, {reply.active_sessions} sessions open")


def status_rows(info: pb.NodeInfo) -> list[tuple[str, str]]:
    """What `coop node status` shows: the span, the load, and every limit with the times it was hit."""
    limits = info.limits
    limited = ", ".join(f"{name} {count}" for name, count in sorted(info.counters.limited.items())) or "none"
    return [
        ("state", info.state or "serving"),
        ("blocks", f"{info.start}:{info.end}"),
        ("model hash", info.model_hash[:16]),
        ("throughput", f"{info.throughput_tps:.1f} tokens/s"),
        ("weight layout", info.weight_layout or "unknown"),
        ("active sessions", f"{info.active_sessions} (at most {limits.sessions_per_peer} per peer)"),
        (
            "KV cache",
            f"{_size(info.reserved_cache_bytes)} reserved, {_size(info.used_cache_bytes)} used, "
            f"{_size(info.free_cache_bytes)} free of {_size(limits.cache_budget_bytes)} "
            f"(shared equally per institution when full, {limits.max_length} tokens per session)",
        ),
        (
            "steps in flight",
            f"{info.steps_in_flight} ({_size(info.in_flight_bytes)}), {info.queued_steps} waiting for the engine "
            f"(at most {limits.steps_in_flight_per_peer} and {_size(limits.in_flight_bytes_per_peer)} per peer, "
            f"{limits.steps_in_flight_per_session} per session)",
        ),
        (
            "sessions",
            f"closed after {limits.idle_timeout_s:g} s idle or {limits.events_per_session} unread events",
        ),
        ("open channels", f"{info.open_channels} (at most {limits.channels})"),
        ("limits hit", limited),
        ("steps run", str(info.counters.steps_run)),
        ("pushes sent", str(info.counters.pushes_sent)),
        ("results sent", str(info.counters.results_sent)),
    ]


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"
