"""The admin JSON API's shapes (`/admin/api/...`); the HTML pages render these same objects.

Amounts are in credits (1 credit = 10**12 FLOPs) as floats for reading, with the exact FLOPs where a
number is used for reconciliation (balances). Times are UTC.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from coop.swarm.node_key import NodeKey


class NodeOut(BaseModel):
    """A node is its (institution, node id): members mint node ids, so two may both run a "gpu-0"."""

    node_id: str
    institution: str
    start: int  # the span [start, end) of blocks: live announcement, else its latest receipt
    end: int
    online: bool
    revoked: bool  # its institution's membership is revoked
    endpoint: str | None = None
    model: str = ""  # the name of the model it serves, where the coordinator serves several (online nodes)
    throughput_tps: float | None = None  # as the node measured and announced it
    sessions: int = 0  # this coordinator's sessions open on it now
    state: str | None = None  # as announced: serving, paused or draining (coop.node.drain); None when offline
    online_since: dt.datetime | None = None  # as observed by this coordinator
    uptime_s: float | None = None
    first_seen: dt.datetime | None = None  # first receipt's start
    last_seen: dt.datetime | None = None  # latest announcement, else latest receipt's end
    receipts: int = 0
    tokens: int = 0
    credits_delivered: float = 0.0
    # its trust record (coop.swarm.trust): spot-checked steps it computed right, checks it failed
    checks_passed: int = 0
    checks_failed: int = 0
    quarantined: str = ""  # the evidence, while it is out of routes; "" if it is not

    @property
    def key(self) -> NodeKey:
        return NodeKey(self.institution, self.node_id)


class NodeReceiptsOut(BaseModel):
    """How collecting one node's receipts went (`coop.coordinator.accounts.receipt_polling.NodeTally`)."""

    institution: str
    node_id: str
    polls: int
    booked: int
    rejected: int  # failed a check
    dropped: int  # signed for a node that is not listed, or more than asked for
    deferred: int  # a listed sibling's, left for the sibling's own poll
    pending: int  # in the last poll: sessions not written down yet
    timeouts: int
    errors: int
    skipped: int  # rounds skipped in backoff
    backoff_rounds: int  # rounds skipped after each poll now


class ReceiptCollectionOut(BaseModel):
    nodes: list[NodeReceiptsOut]
    audit_events_written: int  # rejections audited: at most one event per node per interval
    audit_events_suppressed: int  # rejections counted in another one's event instead of their own


class RatePoint(BaseModel):
    seconds_ago: float
    tokens_per_s: float


class ModelCoverageOut(BaseModel):
    """One model's part of the coverage map: its blocks and the online nodes serving them."""

    name: str  # "": the coordinator's one model
    num_blocks: int
    blocks_uncovered: list[int]
    node_keys: list[str]  # its online nodes, as "institution/node id"
    coverage_svg: str


class OverviewOut(BaseModel):
    pool_name: str
    pool_id: str
    generated_at: dt.datetime
    num_blocks: int | None  # the default model's; None: no live swarm view
    blocks_uncovered: list[int]  # the default model's
    models: list[ModelCoverageOut]  # every model served, the default first
    nodes_online: int
    members_online: int  # institutions with at least one node online
    members_total: int
    live_sessions: int
    tokens_per_s: float | None  # over the last minute; None when the coordinator does not meter
    token_rate: list[RatePoint]
    shade: Literal["throughput", "load"]
    nodes: list[NodeOut]  # the online nodes, as in the coverage map
    coverage_svg: str  # the coverage map (one per model), rendered (the page embeds it, the live refresh swaps it)
    tokens_svg: str
    refused: dict[str, int]  # requests refused since the coordinator started, by error code


class InstitutionOut(BaseModel):
    name: str
    member: bool  # admitted with `coop member add` (False: known to the ledger only)
    revoked: bool
    balance_credits: float
    balance_flops: int
    contributed_credits: float
    used_credits: float
    granted_credits: float
    credit_floor_credits: float | None
    fair_share: float | None  # F = 2^(-U/S); None when the coordinator does not compute it
    nodes_online: int
    api_keys_live: int


class FlowPoint(BaseModel):
    start: dt.datetime
    contributed_credits: float
    used_credits: float


class ApiKeyOut(BaseModel):
    key_id: str  # the first 12 hex digits of its sha256: enough to tell keys apart in the UI
    sha256: str
    created_at: dt.datetime
    revoked: bool


class GrantOut(BaseModel):
    grant_id: str
    credits: float
    reason: str
    granted_by: str
    created_at: dt.datetime


class ReceiptOut(BaseModel):
    receipt_id: str
    session_id: str
    node_id: str
    provider: str
    consumer: str
    start_block: int
    end_block: int
    prefill_tokens: int
    decode_tokens: int
    flops: int
    credits: float
    started_at: dt.datetime
    ended_at: dt.datetime
    booked_at: dt.datetime


class InstitutionDetailOut(BaseModel):
    institution: InstitutionOut
    bucket: Literal["hour", "day"]
    flows: list[FlowPoint]
    flows_svg: str
    nodes: list[NodeOut]
    api_keys: list[ApiKeyOut]
    grants: list[GrantOut]
    receipts: list[ReceiptOut]  # the latest few; the receipts page has them all
    receipts_total: int


class ReceiptPageOut(BaseModel):
    items: list[ReceiptOut]
    total: int
    page: int
    per_page: int
    pages: int


class AuditEventOut(BaseModel):
    id: int
    at: dt.datetime
    actor: str
    action: str
    subject: str
    detail: str


class AuditPageOut(BaseModel):
    items: list[AuditEventOut]
    total: int
    page: int
    per_page: int
    pages: int
    actions: list[str]  # every action in the log, for filtering
    revoked_members: list[str]  # from the pool's CA-signed revocation list


class GrantIn(BaseModel):
    institution: str = Field(min_length=1, max_length=128)
    credits: float = Field(allow_inf_nan=False, ge=-1e9, le=1e9)  # negative takes credits back
    reason: str = Field(min_length=1, max_length=500)


class ApiKeyCreateIn(BaseModel):
    institution: str = Field(min_length=1, max_length=128)


class ApiKeyCreatedOut(BaseModel):
    institution: str
    key: str  # shown this once: only its sha256 is stored
    key_id: str


class ApiKeyRevokeIn(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
