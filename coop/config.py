"""Typed, frozen settings for each process: the one definition of every setting Coop reads.

Each field is a setting, with the same name everywhere: field `cache_budget_mb` is the flag
`--cache-budget-mb`, the variable `COOP_NODE_CACHE_BUDGET_MB` and the key `cache_budget_mb` of a
`--config` TOML file, in the same unit. Its description and unit are what `--help`, `coop node config`
and docs/configuration.md show. Precedence (coop.config_sources): flag > environment > file > default.
The CLI builds one of these per process and passes it down; nothing reads the environment at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_POOL_ID = "default"
DEFAULT_SESSION_IDLE_TIMEOUT_S = 120.0


def setting(default: Any = ..., *, unit: str, doc: str, flag: str = "", secret: bool = False, **bounds: Any) -> Any:
    """A settings field. `flag` names a flag other than `--<field>`: only `--model` and `--member`, which every
    `coop` command shares; `secret` masks its value wherever settings are shown."""
    extra: dict[str, Any] = {"unit": unit, "flag": flag, "secret": secret}
    return Field(default, description=doc, json_schema_extra=extra, **bounds)


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COOP_NODE_", frozen=True)

    model_dir: Path = setting(unit="path", flag="--model", doc="a prepared model directory (the first --model)")
    more_model_dirs: tuple[Path, ...] = setting(
        (),
        unit="paths",
        flag="--model",
        doc='more prepared models (--model repeated): with blocks "auto" the node starts on and moves to the model '
        "and span where it adds most (coop/swarm/rebalance.py)",
    )
    blocks: str = setting(
        "auto",
        unit="START:END",
        doc='"A:B" to serve blocks [A, B) of model_dir, pinned; or "auto" to take the window, of any of its models, '
        "where the pool needs it most (of max_blocks blocks)",
    )
    rebalance: bool = setting(
        True,
        unit="boolean",
        doc='with blocks "auto": re-evaluate every rebalance_interval_s (+-50% jitter) and move (drain first) when '
        "the pool's bottleneck throughput would grow more than rebalance_threshold times, or a gap be covered",
    )
    rebalance_interval_s: float = setting(10.0, unit="seconds", doc="how often rebalancing looks", gt=0)
    rebalance_threshold: float = setting(
        1.25, unit="ratio", doc="move when the bottleneck throughput would grow this many times", ge=1.0
    )
    rebalance_dwell_s: float = setting(
        60.0, unit="seconds", doc="never move sooner than this after the start or the last move", ge=0
    )
    max_blocks: int = setting(
        0, unit="blocks", doc='how many blocks "auto" takes; 0 = as many as fit in memory_budget_bytes', ge=0
    )
    memory_budget_bytes: int = setting(
        4 << 30, unit="bytes", doc='bytes of block parameters "auto" may load (used when max_blocks is 0)', gt=0
    )
    host: str = setting("127.0.0.1", unit="address", doc="the address the gRPC server listens on")
    port: int = setting(0, unit="port", doc="the gRPC port (0 = any free port)", ge=0, le=65535)
    announce_host: str = setting(
        "", unit="address", doc="the address other processes reach this node at (default: host)"
    )
    public_endpoint: str = setting(
        "",
        unit="HOST:PORT",
        doc="announced instead of the node's own address and port, for a node reached through a port forward, NAT, "
        "Docker or a TCP proxy (TLS names the node, not the address, so proxies work)",
        pattern=r"^$|^[^\s:]+:\d{1,5}$",
    )
    initial_peers: tuple[str, ...] = setting((), unit="multiaddrs", doc="DHT multiaddrs of any pool member")
    dht_port: int = setting(0, unit="port", doc="the node's own DHT peer's port (0 = any free port)", ge=0, le=65535)
    pool_id: str = setting(DEFAULT_POOL_ID, unit="name", doc="the pool (set by a member bundle)")
    institution: str = setting("local", unit="name", doc="the institution (set by a member bundle)")
    node_id: str = setting("", unit="name", doc="the node's id (default: a random id per start)")
    device: str = setting("auto", unit="device", doc='"auto", "cpu", "cuda", "cuda:1", "mps"')
    cpu_weight_layout: str = setting(
        "auto",
        unit="layout",
        doc='how float32 CPU Linear weights run: "auto" times torch\'s stock layout against oneDNN-packed on this '
        "machine at load, for 1 row and max_batch_steps rows, and keeps the faster (coop/model/weight_layout.py); "
        '"stock" or "packed" forces one',
        pattern=r"^(auto|stock|packed)$",
    )
    announce_ttl_s: float = setting(
        9.0, unit="seconds", doc="a node that dies drops out of routes within this many seconds", gt=1.0
    )
    member_bundle: Path | None = setting(
        None,
        unit="path",
        flag="--member",
        doc="the institution's member bundle (`coop member add`): mutual TLS and signed announcements; without it "
        'the node runs in development mode: plaintext, unsigned, pool "default"',
    )
    outbox_path: Path | None = setting(
        None,
        unit="path",
        doc="signed receipts wait here until a coordinator books them (default: <member_bundle>.outbox.db)",
    )
    receipt_batch_tokens: int = setting(
        64,
        unit="tokens",
        doc="a receipt covers a batch of a session's steps, closed at the first step that makes it this many tokens "
        "or receipt_batch_s old (and at the session's end): a node killed loses at most one batch of pay",
        gt=0,
    )
    receipt_batch_s: float = setting(30.0, unit="seconds", doc="the age at which a receipt's batch closes", gt=0)
    outbox_retention_s: float = setting(
        30 * 24 * 3600.0,
        unit="seconds",
        doc="receipts rejected, or never booked, are dropped from the outbox after this long",
        gt=0,
    )
    outbox_max_rejected: int = setting(
        10_000, unit="receipts", doc="rejected receipts kept in the outbox (the newest)", ge=0
    )
    metrics_port: int | None = setting(
        None,
        unit="port",
        doc="serve Prometheus /metrics on this port (0 = any free port, printed in the ready line); unset = not "
        "served. Unauthenticated, like every Prometheus exporter: keep metrics_host on a private interface",
        ge=0,
        le=65535,
    )
    metrics_host: str = setting("127.0.0.1", unit="address", doc="the address /metrics listens on")
    drain_deadline_s: float = setting(
        60.0,
        unit="seconds",
        doc="a draining node (SIGTERM, `coop node drain`) exits once its sessions moved, or after this long at most",
        ge=0,
    )
    serving_hours: str = setting(
        "",
        unit="HH:MM-HH:MM",
        doc='local time (may wrap past midnight): outside these hours the node is paused; "" = always',
    )
    gpu_yield_below_gib: float = setting(
        0.0,
        unit="GiB",
        doc="on a GPU: pause (a planned move, like `coop node pause`) while less than this much device memory is "
        "available to local processes, and serve again once twice as much has been available for "
        "gpu_yield_resume_s; 0 = never yield (coop.node.memory_yield)",
        ge=0,
    )
    gpu_yield_resume_s: float = setting(
        60.0, unit="seconds", doc="how long memory must stay available before a yielded node serves again", ge=0
    )
    control_socket: Path | None = setting(
        None,
        unit="path",
        doc="the unix socket the node's owner controls it through on its machine (default: one per node id)",
    )

    # -- limits: what one peer can make this node hold (README, "Limits"; `coop node status`) --
    cache_budget_mb: int = setting(
        2048,
        unit="MiB",
        doc="KV cache all sessions together may reserve (each reserves max_length tokens' worth); anyone may "
        "fill it, and under contention each consuming institution gets an equal share",
        gt=0,
    )
    max_sessions_per_peer: int = setting(128, unit="sessions", doc="sessions one peer may hold open", gt=0)
    idle_timeout_s: float = setting(
        300.0, unit="seconds", doc="a session with no step for this long is closed and its cache freed", gt=0
    )
    max_in_flight_bytes_per_peer: int = setting(
        256 << 20,
        unit="bytes",
        doc="hidden-state bytes of the steps one caller may have accepted here and not yet run and pushed",
        gt=0,
    )
    max_steps_in_flight_per_peer: int = setting(256, unit="steps", doc="steps one caller may have in flight", gt=0)
    max_steps_in_flight_per_session: int = setting(4, unit="steps", doc="steps one session may have in flight", gt=0)
    max_events_per_session: int = setting(
        16,
        unit="events",
        doc="results and failures held for a session's coordinator; one that lets more pile up loses the session",
        gt=0,
    )
    max_channels: int = setting(
        64,
        unit="channels",
        doc="gRPC channels to other nodes kept open; beyond, the least recently used idle one is closed",
        gt=0,
    )
    max_batch_steps: int = setting(
        16,
        unit="steps",
        doc="steps of different sessions that wait together run as one forward pass (coop.node.batching), up to "
        "this many; 1 = off. Batching reorders float sums (logits move by ~1e-4 in float32), so a greedy near-tie "
        "may break differently from a single-process run (bench/README.md, 'Batched steps')",
        ge=1,
    )
    batch_gather_s: float = setting(0.02, unit="seconds", doc="the longest a step waits for its batch-mates", ge=0)

    def resolved_outbox_path(self) -> Path | None:
        if self.outbox_path is not None:
            return self.outbox_path
        return None if self.member_bundle is None else self.member_bundle.with_suffix(".outbox.db")


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COOP_COORDINATOR_", frozen=True)

    model_dir: Path = setting(
        unit="path", flag="--model", doc="the default model (the first --model): what a request naming none gets"
    )
    extra_model_dirs: tuple[Path, ...] = setting(
        (), unit="paths", flag="--model", doc="more models (--model repeated), routed by the request's model name"
    )
    host: str = setting("127.0.0.1", unit="address", doc="the address the HTTP API listens on")
    port: int = setting(8000, unit="port", doc="the HTTP API's port (0 = any free port)", ge=0, le=65535)
    initial_peers: tuple[str, ...] = setting((), unit="multiaddrs", doc="DHT multiaddrs of any pool member")
    pool_id: str = setting(DEFAULT_POOL_ID, unit="name", doc="the pool (set by a member bundle)")
    device: str = setting("auto", unit="device", doc='where the client part runs: "auto", "cpu", "cuda", "mps"')
    max_context: int = setting(2048, unit="tokens", doc="the longest session (prompt and completion)", gt=0)
    refresh_s: float = setting(1.0, unit="seconds", doc="how often the list of nodes is re-read from the DHT", gt=0)
    step_timeout_s: float = setting(
        30.0, unit="seconds", doc="a step that takes longer than this is treated as a node failure", gt=0
    )
    max_failovers: int = setting(3, unit="failovers", doc="route replacements one request may take", ge=0)
    member_bundle: Path | None = setting(
        None,
        unit="path",
        flag="--member",
        doc="as for nodes: mutual TLS to nodes, and only nodes signed by the pool CA are routed to",
    )
    api_keys: Path | None = setting(
        None,
        unit="path",
        doc="the pool's api_keys.json: requests need `Authorization: Bearer <key>`; unset = no keys (development)",
    )
    ledger_url: str | None = setting(
        None,
        unit="URL",
        secret=True,
        doc="the ledger (needs member_bundle: receipts are signed). Default: pool_dir's 0600 ledger.url, else SQLite "
        "in pool_dir, else next to the member bundle. PostgreSQL: postgresql+psycopg://user:pw@host/db "
        "(see `coop ledger create-role` for one role per coordinator)",
    )
    pool_dir: Path | None = setting(
        None, unit="path", doc="the pool directory (`coop pool init`): the admin view's login, members and API keys"
    )
    fair_share_half_life_s: float = setting(
        7 * 24 * 3600.0, unit="seconds", doc="fair share: usage and contribution lose half their weight", gt=0
    )
    max_active_sessions: int = setting(
        32, unit="sessions", doc="sessions run at once; beyond, requests wait and start in fair-share order", gt=0
    )
    receipt_interval_s: float = setting(2.0, unit="seconds", doc="how often receipts are collected from nodes", gt=0)
    observation_checkpoint_tokens: int = setting(
        64,
        unit="tokens",
        doc="a session's observation (the ceiling of its receipts) is written at its first step, then every this "
        "many tokens or observation_checkpoint_s, and at its end: a crash loses at most that much of it",
        gt=0,
    )
    observation_checkpoint_s: float = setting(30.0, unit="seconds", doc="see observation_checkpoint_tokens", gt=0)
    # -- what one node can make receipt collection spend (coop.coordinator.accounts.receipt_collection) --
    receipt_poll_budget_s: float = setting(5.0, unit="seconds", doc="one node's poll, all calls; then cut off", gt=0)
    receipt_max_concurrent_polls: int = setting(16, unit="nodes", doc="nodes polled for receipts at once", gt=0)
    receipt_batch: int = setting(200, unit="receipts", doc="receipts asked of a node per call; more dropped", gt=0)
    receipt_audit_interval_s: float = setting(
        60.0, unit="seconds", doc="a node's rejected receipts are audited once per interval, with a count", gt=0
    )
    receipt_max_backoff_rounds: int = setting(
        32, unit="rounds", doc="a junk or slow node is skipped for up to this many rounds", gt=0
    )
    session_idle_timeout_s: float = setting(
        DEFAULT_SESSION_IDLE_TIMEOUT_S,
        unit="seconds",
        doc="an SDK session (the chain relay) idle this long is closed, giving back its KV caches and slots",
        gt=0,
    )
    # -- what one HTTP client can make the coordinator hold or spend (coop.coordinator.http.limits) --
    max_relay_tokens_per_institution: int = setting(
        16384,
        unit="tokens",
        doc="max_length of the SDK sessions (the chain relay) one institution may hold open together",
        gt=0,
    )
    max_request_bytes: int = setting(
        4 << 20,
        unit="bytes",
        doc="one request body; more is refused (413) before it is read, and the API key is checked first (401)",
        gt=0,
    )
    max_stop_sequences: int = setting(16, unit="strings", doc="stop strings per request", ge=0)
    max_stop_chars: int = setting(256, unit="characters", doc="characters of one stop string", gt=0)
    max_messages: int = setting(1024, unit="messages", doc="messages of one chat request", gt=0)
    max_prompt_chars: int = setting(
        1 << 20, unit="characters", doc="a request's text: every message together, or the prompt", gt=0
    )
    max_prompt_tokens: int = setting(0, unit="tokens", doc="0 = the model's context (max_context)", ge=0)
    text_workers: int = setting(
        4, unit="threads", doc="threads that tokenize, detokenize and match stop strings, off the event loop", gt=0
    )
    max_queued_events_per_session: int = setting(
        8, unit="events", doc="a node session's queued events; a full queue pauses reading them", gt=0
    )
    speculative_tokens: int = setting(
        4,
        unit="tokens",
        doc="greedy requests: prompt-lookup draft tokens per step, verified by the route in the same pass (same "
        "tokens, fewer round trips); 0 = off. Nodes compute, and are paid for, the rejected drafts too",
        ge=0,
    )
    admin_sign_in_burst: int = setting(
        10, unit="attempts", doc="failed admin sign-ins one client address may make in a burst (then 429)", gt=0
    )
    admin_sign_in_refill_s: float = setting(
        60.0, unit="seconds", doc="after this, a throttled client address may make one more sign-in", gt=0
    )
    trusted_proxies: tuple[str, ...] = setting(
        (),
        unit="addresses",
        doc="IP addresses or networks (CIDR) of reverse proxies in front of the API whose X-Forwarded-For names "
        "the client; empty = the socket peer is the client, and X-Forwarded-For is ignored",
    )
    public_api_docs: bool | None = setting(
        None,
        unit="boolean",
        doc="/docs, /redoc and /openapi.json for anyone; unset = only in development mode (no member bundle)",
    )
    metrics_token: SecretStr | None = setting(
        None,
        unit="token",
        secret=True,
        doc="/metrics answers only `Authorization: Bearer <token>` when set; unset = anyone who reaches the API",
    )
    # -- spot checks (coop.coordinator.spot_checks): sessions re-computed on other replicas, step by step --
    spot_check_rate: float = setting(0.03, unit="fraction", doc="share of sessions checked; 0 and 0 = off", ge=0, le=1)
    spot_check_new_node_rate: float = setting(
        0.2,
        unit="fraction",
        doc="the share when a node of the route has passed fewer than spot_check_history_steps checked steps",
        ge=0,
        le=1,
    )
    spot_check_history_steps: int = setting(200, unit="steps", doc="checked steps that make a node known", ge=0)
    spot_check_tolerance: float = setting(
        0.005,
        unit="ratio",
        doc="the largest honest distance per token: |claimed - recomputed| / |what the hop added|, on sketches "
        "(calibrated in tests/unit/test_spot_checks.py)",
        gt=0,
    )
    sketch_dims: int = setting(32, unit="dimensions", doc="dimensions of each hop's step sketches", ge=1, le=64)

    @property
    def model_dirs(self) -> tuple[Path, ...]:
        """Every model served, the default first."""
        return (self.model_dir, *self.extra_model_dirs)


class DhtSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COOP_DHT_", frozen=True)

    host: str = setting("127.0.0.1", unit="address", doc="the address the DHT peer listens on")
    port: int = setting(0, unit="port", doc="the DHT port (0 = any free port)", ge=0, le=65535)
    initial_peers: tuple[str, ...] = setting((), unit="multiaddrs", doc="DHT multiaddrs of any pool member")
    member_bundle: Path | None = setting(
        None, unit="path", flag="--member", doc="the member running the peer: it then holds only pool records"
    )
    identity: Path | None = setting(
        None, unit="path", doc="peer key file (made if missing): the same multiaddr after every restart"
    )
