"""What each admin page and API call shows: the ledger, the pool directory and the live swarm, joined.

Blocking (database and file reads): the routers call these from a worker thread.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coop.admin import charts, queries
from coop.admin.context import TOKEN_WINDOW_S, AdminContext
from coop.admin.protocol import (
    ApiKeyOut,
    AuditEventOut,
    AuditPageOut,
    FlowPoint,
    GrantOut,
    InstitutionDetailOut,
    InstitutionOut,
    ModelCoverageOut,
    NodeOut,
    OverviewOut,
    RatePoint,
    ReceiptOut,
    ReceiptPageOut,
)
from coop.admin.queries import AuditFilter, Bucket, ReceiptFilter, as_utc
from coop.admin.series import flow_series, flow_window, recent_rate, token_rate
from coop.ledger.models import Receipt, flops_to_credits
from coop.pool.api_keys import ApiKeyRecord, ApiKeyStore
from coop.pool.registry import API_KEYS_FILE, MemberInfo, PoolInfo, list_members, read_revocations
from coop.swarm.announcement import SERVING, NodeAnnouncement
from coop.swarm.node_key import NodeKey, key_of
from coop.swarm.trust import TrustRecord, trust_from_ledger

DETAIL_RECEIPTS = 20
SMALL_CHART_WIDTH = 480  # the institutions page's small multiples


def utc_from_s(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


@dataclass(frozen=True)
class PoolState:
    """The pool directory as read once for one request."""

    info: PoolInfo
    members: list[MemberInfo]
    revoked: frozenset[str]
    keys: tuple[ApiKeyRecord, ...]

    @classmethod
    def read(cls, ctx: AdminContext) -> PoolState:
        info = PoolInfo.load(ctx.pool_dir)
        return cls(
            info,
            list_members(ctx.pool_dir),
            frozenset(read_revocations(info).revoked),
            ApiKeyStore.load(ctx.pool_dir / API_KEYS_FILE).records,
        )


@dataclass(frozen=True)
class LiveModel:
    name: str  # "": the coordinator's one model, unnamed in the view
    num_blocks: int
    node_keys: frozenset[NodeKey]  # its online nodes


@dataclass(frozen=True)
class Live:
    """The coordinator's live swarm view, copied on the event loop that updates it (views run in threads)."""

    nodes: list[NodeAnnouncement]  # of every model
    load: dict[NodeKey, int]  # open sessions by node
    models: list[LiveModel]  # the default model first
    sessions_open: int  # each once, however many nodes its route has

    @property
    def num_blocks(self) -> int | None:
        """The default model's (None: no live view)."""
        return self.models[0].num_blocks if self.models else None

    @classmethod
    def snapshot(cls, ctx: AdminContext) -> Live:
        nodes: list[NodeAnnouncement] = []
        load: dict[NodeKey, int] = {}
        models = []
        sessions_open = 0
        for name, swarm in ctx.swarms().items():
            live = list(swarm.live_nodes())
            nodes += live
            load |= swarm.load
            sessions_open += swarm.sessions_open
            models.append(LiveModel(name, swarm.num_blocks, frozenset(key_of(n) for n in live)))
        return cls(nodes, load, models, sessions_open)


def nodes(ctx: AdminContext, pool: PoolState, now: Live, *, now_s: float | None = None) -> list[NodeOut]:
    """Online nodes first, then every other node the ledger has receipts of, each by (institution, node id):
    two members' nodes of one id are two rows."""
    now_s = time.time() if now_s is None else now_s
    live, load = sorted(now.nodes, key=key_of), now.load
    since = ctx.presence.observe([key_of(n) for n in live])
    model_of = {key: model.name for model in now.models for key in model.node_keys}
    stats = queries.node_stats(ctx.ledger.engine)
    trust = trust_from_ledger(ctx.ledger)
    out = []
    for ann in live:
        key = key_of(ann)
        s = stats.get(key)
        out.append(
            NodeOut(
                node_id=ann.node_id,
                institution=ann.institution,
                start=ann.start,
                end=ann.end,
                online=True,
                revoked=ann.institution in pool.revoked,
                endpoint=ann.endpoint,
                model=model_of.get(key, ""),
                throughput_tps=ann.throughput_tps,
                sessions=load.get(key, 0),
                state=ann.state,
                online_since=utc_from_s(since[key]),
                uptime_s=max(0.0, now_s - since[key]),
                first_seen=s.first_started if s else None,
                last_seen=utc_from_s(ann.announced_at),
                receipts=s.receipts if s else 0,
                tokens=s.tokens if s else 0,
                credits_delivered=flops_to_credits(s.flops) if s else 0.0,
                **_trust_fields(trust.get(key)),
            )
        )
    online = set(since)
    for row in ctx.ledger.nodes():
        if key_of(row) in online:
            continue
        s = stats.get(key_of(row))
        out.append(
            NodeOut(
                node_id=row.node_id,
                institution=row.institution,
                start=row.start_block,
                end=row.end_block,
                online=False,
                revoked=row.institution in pool.revoked,
                first_seen=as_utc(row.first_seen),
                last_seen=as_utc(row.last_seen),
                receipts=s.receipts if s else 0,
                tokens=s.tokens if s else 0,
                credits_delivered=flops_to_credits(s.flops) if s else 0.0,
                **_trust_fields(trust.get(key_of(row))),
            )
        )
    return out


def _trust_fields(record: TrustRecord | None) -> dict[str, Any]:
    if record is None:
        return {}
    return {"checks_passed": record.passed, "checks_failed": record.failed, "quarantined": record.quarantined}


def _coverage_rows(online: Sequence[NodeOut], shade: str) -> list[charts.CoverageRow]:
    if shade == "load":
        top = max((n.sessions for n in online), default=0) or 1
        shades = [n.sessions / top for n in online]
    else:
        top_tps = max((n.throughput_tps or 0.0 for n in online), default=0.0) or 1.0
        shades = [(n.throughput_tps or 0.0) / top_tps for n in online]
    rows = []
    for node, level in zip(online, shades, strict=True):
        serving = _routable(node)
        note = f"{node.sessions} sess · {node.throughput_tps or 0:.0f} tok/s"
        if not serving:
            note = "quarantined" if node.quarantined else str(node.state)
        rows.append(charts.CoverageRow(node.node_id, node.institution, node.start, node.end, level, note, serving))
    return rows


def _routable(node: NodeOut) -> bool:
    """Whether routes may use the node now: serving, not quarantined (what /v1/models counts as coverage)."""
    return node.state in (None, SERVING) and not node.quarantined


def _model_coverage(model: LiveModel, online: Sequence[NodeOut], shade: str) -> ModelCoverageOut:
    nodes = [n for n in online if n.key in model.node_keys]
    served = {b for n in nodes if _routable(n) for b in range(n.start, min(n.end, model.num_blocks))}
    rows = _coverage_rows(nodes, shade)
    return ModelCoverageOut(
        name=model.name,
        num_blocks=model.num_blocks,
        blocks_uncovered=[b for b in range(model.num_blocks) if b not in served],
        node_keys=[str(n.key) for n in nodes],
        coverage_svg=charts.coverage_map(model.num_blocks, rows, shaded_by=shade, model=model.name),
    )


def node_list(ctx: AdminContext, live: Live) -> list[NodeOut]:
    return nodes(ctx, PoolState.read(ctx), live)


def overview(ctx: AdminContext, live: Live, *, shade: str = "throughput", now_s: float | None = None) -> OverviewOut:
    now_s = time.time() if now_s is None else now_s
    shade = "load" if shade == "load" else "throughput"
    pool = PoolState.read(ctx)
    online = [n for n in nodes(ctx, pool, live, now_s=now_s) if n.online]
    models = [_model_coverage(model, online, shade) for model in live.models]
    samples = list(ctx.token_samples()) if ctx.token_samples is not None else None
    rate = token_rate(samples or [], now_s=now_s, window_s=TOKEN_WINDOW_S)
    return OverviewOut(
        pool_name=pool.info.name,
        pool_id=pool.info.pool_id,
        generated_at=utc_from_s(now_s),
        num_blocks=live.num_blocks,
        blocks_uncovered=models[0].blocks_uncovered if models else [],
        models=models,
        nodes_online=len(online),
        members_online=len({n.institution for n in online}),
        members_total=sum(1 for m in pool.members if not m.revoked),
        live_sessions=live.sessions_open,
        tokens_per_s=None if samples is None else recent_rate(samples, now_s=now_s),
        token_rate=[RatePoint(seconds_ago=ago, tokens_per_s=v) for ago, v in rate] if samples is not None else [],
        shade=shade,  # type: ignore[arg-type]
        nodes=online,
        coverage_svg="".join(model.coverage_svg for model in models),  # one map (row group) per model
        tokens_svg=charts.rate_chart(rate if samples is not None else [], window_s=TOKEN_WINDOW_S),
        refused=refused(ctx),
    )


def refused(ctx: AdminContext) -> dict[str, int]:
    """Requests refused by the coordinator's API and admin sign-ins refused, by error code."""
    counts = Counter(ctx.rejections() if ctx.rejections is not None else {})
    counts.update(ctx.sign_in.counts())
    return dict(sorted(counts.items()))


def _institutions(ctx: AdminContext, pool: PoolState, online: Sequence[NodeOut]) -> list[InstitutionOut]:
    balances = {b.institution: b for b in ctx.ledger.balances()}
    members = {m.institution for m in pool.members}
    nodes_online = Counter(n.institution for n in online)
    keys_live = Counter(k.institution for k in pool.keys if not k.revoked)
    out = []
    for name in sorted(balances.keys() | members):
        b = balances.get(name)
        floor = b.credit_floor_flops if b else None
        out.append(
            InstitutionOut(
                name=name,
                member=name in members,
                revoked=name in pool.revoked,
                balance_credits=flops_to_credits(b.balance_flops) if b else 0.0,
                balance_flops=b.balance_flops if b else 0,
                contributed_credits=flops_to_credits(b.contributed_flops) if b else 0.0,
                used_credits=flops_to_credits(b.used_flops) if b else 0.0,
                granted_credits=flops_to_credits(b.granted_flops) if b else 0.0,
                credit_floor_credits=None if floor is None else flops_to_credits(floor),
                fair_share=ctx.fair_share(name) if ctx.fair_share is not None else None,
                nodes_online=nodes_online[name],
                api_keys_live=keys_live[name],
            )
        )
    return out


def institutions(ctx: AdminContext, live: Live) -> list[InstitutionOut]:
    pool = PoolState.read(ctx)
    return _institutions(ctx, pool, [n for n in nodes(ctx, pool, live) if n.online])


def flow_charts(ctx: AdminContext, names: Sequence[str], *, bucket: Bucket = "hour") -> list[tuple[str, str]]:
    """(institution, SVG of its contribution and usage) for each name, from one grouped query."""
    now = dt.datetime.now(dt.UTC)
    count, since = flow_window(bucket, now)
    flows = queries.flow_buckets(ctx.ledger.engine, since=since, bucket=bucket)
    period = "last 48 hours, hourly" if bucket == "hour" else "last 30 days, daily"
    return [
        (
            name,
            charts.flow_chart(
                flow_series(flows, institution=name, bucket=bucket, end=now, count=count),
                bucket=bucket,
                title=period,
                width=SMALL_CHART_WIDTH,
            ),
        )
        for name in names
    ]


def receipt_out(r: Receipt) -> ReceiptOut:
    return ReceiptOut(
        receipt_id=r.receipt_id,
        session_id=r.session_id,
        node_id=r.node_id,
        provider=r.provider,
        consumer=r.consumer,
        start_block=r.start_block,
        end_block=r.end_block,
        prefill_tokens=r.prefill_tokens,
        decode_tokens=r.decode_tokens,
        flops=r.flops,
        credits=flops_to_credits(r.flops),
        started_at=as_utc(r.started_at),
        ended_at=as_utc(r.ended_at),
        booked_at=as_utc(r.booked_at),
    )


def institution_detail(
    ctx: AdminContext, live: Live, name: str, *, bucket: Bucket = "hour"
) -> InstitutionDetailOut | None:
    """None if neither the pool nor the ledger knows the institution."""
    pool = PoolState.read(ctx)
    every_node = nodes(ctx, pool, live)
    found = [i for i in _institutions(ctx, pool, [n for n in every_node if n.online]) if i.name == name]
    if not found:
        return None
    now = dt.datetime.now(dt.UTC)
    count, since = flow_window(bucket, now)
    flows = flow_series(
        queries.flow_buckets(ctx.ledger.engine, since=since, bucket=bucket, institution=name),
        institution=name,
        bucket=bucket,
        end=now,
        count=count,
    )
    rows, total = queries.receipt_page(
        ctx.ledger.engine, ReceiptFilter(institution=name), limit=DETAIL_RECEIPTS, offset=0
    )
    period = "the last 48 hours, hourly" if bucket == "hour" else "the last 30 days, daily"
    return InstitutionDetailOut(
        institution=found[0],
        bucket=bucket,
        flows=[FlowPoint(start=s, contributed_credits=c, used_credits=u) for s, c, u in flows],
        flows_svg=charts.flow_chart(flows, bucket=bucket, title=f"Contribution and usage of {name}, {period}"),
        nodes=[n for n in every_node if n.institution == name],
        api_keys=[
            ApiKeyOut(key_id=k.sha256[:12], sha256=k.sha256, created_at=utc_from_s(k.created_at), revoked=k.revoked)
            for k in sorted(pool.keys, key=lambda k: -k.created_at)
            if k.institution == name
        ],
        grants=[
            GrantOut(
                grant_id=g.grant_id,
                credits=flops_to_credits(g.flops),
                reason=g.reason,
                granted_by=g.granted_by,
                created_at=as_utc(g.created_at),
            )
            for g in queries.grants(ctx.ledger.engine, name)
        ],
        receipts=[receipt_out(r) for r in rows],
        receipts_total=total,
    )


def _pages(total: int, per_page: int) -> int:
    return max(1, math.ceil(total / per_page))


def receipt_page(ctx: AdminContext, filters: ReceiptFilter, *, page: int, per_page: int) -> ReceiptPageOut:
    rows, total = queries.receipt_page(ctx.ledger.engine, filters, limit=per_page, offset=(page - 1) * per_page)
    return ReceiptPageOut(
        items=[receipt_out(r) for r in rows], total=total, page=page, per_page=per_page, pages=_pages(total, per_page)
    )


def audit_page(ctx: AdminContext, filters: AuditFilter, *, page: int, per_page: int) -> AuditPageOut:
    rows, total = queries.audit_page(ctx.ledger.engine, filters, limit=per_page, offset=(page - 1) * per_page)
    pool = PoolState.read(ctx)
    return AuditPageOut(
        items=[
            AuditEventOut(
                id=e.id or 0, at=as_utc(e.at), actor=e.actor, action=e.action, subject=e.subject, detail=e.detail
            )
            for e in rows
        ],
        total=total,
        page=page,
        per_page=per_page,
        pages=_pages(total, per_page),
        actions=queries.audit_actions(ctx.ledger.engine),
        revoked_members=sorted(pool.revoked),
    )
