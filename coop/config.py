"""Typed, frozen settings for each process, from flags, COOP_* environment variables and defaults.

The CLI builds one of these per process and passes it down; nothing reads the environment at
import time.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_POOL_ID = "default"
DEFAULT_SESSION_IDLE_TIMEOUT_S = 120.0


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COOP_NODE_", frozen=True)

    model_dir: Path
    # more prepared models the node may serve: with blocks "auto", it starts on and moves to the model
    # and span where it adds most (coop/swarm/rebalance.py)
    more_model_dirs: tuple[Path, ...] = ()
    # "A:B" to serve blocks [A, B) of model_dir, pinned; or "auto" to take the window, of any of its models,
    # where the pool needs it most (of max_blocks blocks)
    blocks: str = "auto"
    # with blocks "auto": re-evaluate every rebalance_interval_s (+-50% jitter) and move (drain first) when
    # the pool's bottleneck throughput would grow more than rebalance_threshold times, or a gap be covered;
    # never sooner than rebalance_dwell_s after the start or the last move
    rebalance: bool = True
    rebalance_interval_s: float = Field(default=10.0, gt=0)
    rebalance_threshold: float = Field(default=1.25, ge=1.0)
    rebalance_dwell_s: float = Field(default=60.0, ge=0)
    # how many blocks "auto" takes; 0 = as many as fit in memory_budget_bytes
    max_blocks: int = Field(default=0, ge=0)
    # bytes of block parameters "auto" may load (used when max_blocks is 0)
    memory_budget_bytes: int = Field(default=4 << 30, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)  # 0 = any free port
    # the address other processes reach this node at (default: host)
    announce_host: str = ""
    # "HOST:PORT" announced instead of the node's own address and port, for a node reached through a
    # port forward, NAT, Docker or a TCP proxy (TLS names the node, not the address, so proxies work)
    public_endpoint: str = Field(default="", pattern=r"^$|^[^\s:]+:\d{1,5}$")
    initial_peers: tuple[str, ...] = ()
    dht_port: int = Field(default=0, ge=0, le=65535)
    pool_id: str = DEFAULT_POOL_ID
    institution: str = "local"
    node_id: str = ""  # default: a random id per start
    device: str = "auto"
    # a node that dies drops out of routes within this many seconds
    announce_ttl_s: float = Field(default=9.0, gt=1.0)
    # the institution's member bundle (`coop member add`): mutual TLS and signed announcements.
    # Without it the node runs in development mode: plaintext, unsigned, pool "default".
    member_bundle: Path | None = None
    # signed receipts wait here until a coordinator books them (default: <member_bundle>.outbox.db)
    outbox_path: Path | None = None
    # a receipt covers a batch of a session's steps, closed at the first step that makes it this many
    # tokens or this old (and at the session's end): a node killed loses at most one batch of pay
    receipt_batch_tokens: int = Field(default=64, gt=0)
    receipt_batch_s: float = Field(default=30.0, gt=0)
    # receipts rejected, or never booked, are dropped from the outbox after this long; of the rejected,
    # at most outbox_max_rejected are kept (the newest)
    outbox_retention_s: float = Field(default=30 * 24 * 3600.0, gt=0)
    outbox_max_rejected: int = Field(default=10_000, ge=0)
    # Prometheus /metrics on this port (0 = any free port, printed in the ready line); None = not served.
    # Unauthenticated, like every Prometheus exporter: keep metrics_host on a private interface.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # a draining node (SIGTERM, `coop node drain`) exits once its sessions moved, or after this long at most
    drain_deadline_s: float = Field(default=60.0, ge=0)
    # "HH:MM-HH:MM", local time (may wrap past midnight): outside these hours the node is paused; "" = always
    serving_hours: str = ""
    # on a GPU: pause (a planned move, like `coop node pause`) while less than this many bytes of device
    # memory are available to local processes, and serve again once twice as many have been available for
    # gpu_yield_resume_s; 0 = never yield (coop.node.memory_yield)
    gpu_yield_below_bytes: int = Field(default=0, ge=0)
    gpu_yield_resume_s: float = Field(default=60.0, ge=0)
    # the unix socket the node's owner controls it through on its machine (default: control_socket_path)
    control_socket: Path | None = None

    # -- limits: what one peer can make this node hold (README, "Limits"; `coop node status`) --
    # bytes of KV cache all sessions together may reserve (each reserves max_length tokens' worth)
    cache_budget_bytes: int = Field(default=2 << 30, gt=0)
    # share of cache_budget_bytes one peer (a coordinator) may reserve ...
    max_cache_fraction_per_peer: float = Field(default=0.25, gt=0, le=1)
    # ... or exactly this many bytes, when not 0
    max_cache_bytes_per_peer: int = Field(default=0, ge=0)
    max_sessions_per_peer: int = Field(default=128, gt=0)
    # a session with no step for this long is closed by the node and its cache freed
    idle_timeout_s: float = Field(default=300.0, gt=0)
    # hidden-state bytes of the steps one caller may have accepted here and not yet run and pushed
    max_in_flight_bytes_per_peer: int = Field(default=256 << 20, gt=0)
    max_steps_in_flight_per_peer: int = Field(default=256, gt=0)
    max_steps_in_flight_per_session: int = Field(default=4, gt=0)
    # results and failures held for a session's coordinator; one that lets more pile up loses the session
    max_events_per_session: int = Field(default=16, gt=0)
    # gRPC channels to other nodes kept open; beyond, the least recently used idle one is closed
    max_channels: int = Field(default=64, gt=0)
    # steps of different sessions that wait together run as one forward pass (coop.node.batching), up to
    # this many; 1 = off, the default: batching reorders float sums, so near-ties in greedy decoding
    # may break differently from a single-process run (measured: 8 sessions 2.45x one, against 1.55x)
    max_batch_steps: int = Field(default=1, ge=1)
    batch_gather_s: float = Field(default=0.02, ge=0)  # the longest a step waits for its batch-mates

    def resolved_outbox_path(self) -> Path | None:
        if self.outbox_path is not None:
            return self.outbox_path
        return None if self.member_bundle is None else self.member_bundle.with_suffix(".outbox.db")


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COOP_COORDINATOR_", frozen=True)

    model_dir: Path  # the default model: what a request that names no model gets
    # more prepared models served side by side, each routed by the request's "model" (its manifest name)
    extra_model_dirs: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    initial_peers: tuple[str, ...] = ()
    pool_id: str = DEFAULT_POOL_ID
    device: str = "auto"
    max_context: int = Field(default=2048, gt=0)
    # how often the list of nodes is re-read from the DHT
    refresh_s: float = Field(default=1.0, gt=0)
    # a step that takes longer than this is treated as a node failure
    step_timeout_s: float = Field(default=30.0, gt=0)
    max_failovers: int = Field(default=3, ge=0)
    # as for nodes: mutual TLS to nodes, and only nodes signed by the pool CA are routed to
    member_bundle: Path | None = None
    # the pool's api_keys.json: requests need `Authorization: Bearer <key>`; None = no keys (development)
    api_keys_file: Path | None = None
    # The ledger (needs member_bundle: receipts are signed). Default: pool_dir's 0600 ledger.url, else
    # SQLite in pool_dir, else next to the member bundle. PostgreSQL: postgresql+psycopg://user:pw@host/db
    # (never in a member bundle; see `coop ledger create-role` for one role per coordinator)
    ledger_url: str | None = None
    # the pool directory (`coop pool init`): the admin view's login, members and API keys live there
    pool_dir: Path | None = None
    # fair share: usage and contribution lose half their weight after this long
    fair_share_half_life_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    # sessions this coordinator runs at once; beyond this, requests wait and start in fair-share order
    max_active_sessions: int = Field(default=32, gt=0)
    # how often receipts are collected from nodes
    receipt_interval_s: float = Field(default=2.0, gt=0)
    # a session's observation (the ceiling of its receipts) is written at its first step, then every
    # this many tokens or seconds, and at its end: a coordinator crash loses at most that much of it
    observation_checkpoint_tokens: int = Field(default=64, gt=0)
    observation_checkpoint_s: float = Field(default=30.0, gt=0)
    # -- what one node can make receipt collection spend (coop.coordinator.accounts.receipt_collection) --
    receipt_poll_budget_s: float = Field(default=5.0, gt=0)  # one node's poll, all calls; then cut off
    receipt_max_concurrent_polls: int = Field(default=16, gt=0)  # nodes polled at once
    receipt_batch: int = Field(default=200, gt=0)  # receipts asked of a node per call; more are dropped
    # rejected receipts of one node are audited at most once per interval, as one event with a count
    receipt_audit_interval_s: float = Field(default=60.0, gt=0)
    receipt_max_backoff_rounds: int = Field(default=32, gt=0)  # a junk or slow node is skipped up to this
    # an SDK session (the chain relay) idle this long is closed, giving back its KV caches and slots
    session_idle_timeout_s: float = Field(default=DEFAULT_SESSION_IDLE_TIMEOUT_S, gt=0)
    # -- what one HTTP client can make the coordinator hold or spend (coop.coordinator.http.limits) --
    # bytes of one request body (relay steps: what the session's length needs); more is refused
    # (413) before it is read, and before it is parsed the API key is checked (401)
    max_request_bytes: int = Field(default=4 << 20, gt=0)
    max_stop_sequences: int = Field(default=16, ge=0)  # stop strings per request
    max_stop_chars: int = Field(default=256, gt=0)  # characters of one stop string
    max_messages: int = Field(default=1024, gt=0)  # messages of one chat request
    # characters of a request's text: every message together, or the completion's prompt
    max_prompt_chars: int = Field(default=1 << 20, gt=0)
    max_prompt_tokens: int = Field(default=0, ge=0)  # 0 = the model's context (max_context)
    # threads that tokenize, detokenize and match stop strings, off the event loop
    text_workers: int = Field(default=4, gt=0)
    # events a node's session streams may queue at the coordinator; a full queue pauses reading them
    max_queued_events_per_session: int = Field(default=8, gt=0)
    # multi-token steps for greedy requests: each step carries up to this many prompt-lookup draft
    # tokens, which the route verifies in the same pass (same tokens, fewer round trips); 0 = off.
    # Nodes compute, and are paid for, the rejected drafts too.
    speculative_tokens: int = Field(default=4, ge=0)
    # failed admin sign-ins (form or bearer token) one client address may make in a burst, and the
    # seconds after which it may make one more; beyond that, 429 with Retry-After
    admin_sign_in_burst: int = Field(default=10, gt=0)
    admin_sign_in_refill_s: float = Field(default=60.0, gt=0)
    # /docs, /redoc and /openapi.json for anyone; None = only in development mode (no member bundle).
    # Signed-in admins always get the schema at /admin/api/openapi.json.
    public_api_docs: bool | None = None
    # /metrics (Prometheus) answers only `Authorization: Bearer <token>` when set; None = anyone who can reach
    # the API, as Prometheus expects (bind the API to a private interface, or set this)
    metrics_token: SecretStr | None = None
    # -- spot checks (coop.coordinator.spot_checks): sessions re-computed on other replicas, step by step --
    spot_check_rate: float = Field(default=0.03, ge=0, le=1)  # share of sessions checked; 0 and 0 = off
    # the share when a node of the route has passed fewer than spot_check_history_steps checked steps
    spot_check_new_node_rate: float = Field(default=0.2, ge=0, le=1)
    spot_check_history_steps: int = Field(default=200, ge=0)
    # the largest honest distance, per token: |claimed - recomputed| / |what the hop added|, on sketches.
    # Calibrated in tests/unit/test_spot_checks.py (honest replicas, same prepared model and dtype)
    spot_check_tolerance: float = Field(default=0.005, gt=0)
    sketch_dims: int = Field(default=32, ge=1, le=64)  # dimensions of each hop's step sketches

    @property
    def model_dirs(self) -> tuple[Path, ...]:
        """Every model served, the default first."""
        return (self.model_dir, *self.extra_model_dirs)
