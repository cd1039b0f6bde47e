"""Typed, frozen settings for each process, from flags, COOP_* environment variables and defaults.

The CLI builds one of these per process and passes it down; nothing reads the environment at
import time.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_POOL_ID = "default"
DEFAULT_SESSION_IDLE_TIMEOUT_S = 120.0


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COOP_NODE_", frozen=True)

    model_dir: Path
    # "A:B" to serve blocks [A, B), or "auto" to take the least-served window that fits max_blocks
    blocks: str = "auto"
    # how many blocks "auto" takes; 0 = as many as fit in memory_budget_bytes
    max_blocks: int = Field(default=0, ge=0)
    # bytes of block parameters "auto" may load (used when max_blocks is 0)
    memory_budget_bytes: int = Field(default=4 << 30, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)  # 0 = any free port
    # the address other processes reach this node at (default: host)
    announce_host: str = ""
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

    def resolved_outbox_path(self) -> Path | None:
        if self.outbox_path is not None:
            return self.outbox_path
        return None if self.member_bundle is None else self.member_bundle.with_suffix(".outbox.db")


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COOP_COORDINATOR_", frozen=True)

    model_dir: Path
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
    # an SDK session (the chain relay) idle this long is closed, giving back its KV caches and slots
    session_idle_timeout_s: float = Field(default=DEFAULT_SESSION_IDLE_TIMEOUT_S, gt=0)
