"""A pool with a ledger filled through the real booking path, for the admin view's tests.

`build_admin_pool` makes a pool directory (CA, members, API keys, one revoked member), books
node-signed, coordinator-countersigned receipts of sessions spread over the last two days into a
real SQLite ledger, grants credits, and builds a live swarm view from signed node announcements.
tests/unit/test_admin_data.py checks that the data is what the admin view's tests assume.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from coop.admin import AdminContext, TokenRateMeter
from coop.ledger.booking import ReceiptChecker
from coop.ledger.database import sqlite_url
from coop.ledger.fairshare import FairShare
from coop.ledger.grants import AdminSigner
from coop.ledger.models import Observation
from coop.ledger.store import Ledger
from coop.pool.bundle import MemberBundle
from coop.pool.registry import PoolInfo, create_api_key, revoke_member
from coop.receipts import ReceiptBody, new_receipt_id, sign_receipt
from coop.swarm.announcement import PAUSED, SERVING, NodeAnnouncement, sign_announcement
from coop.swarm.node_key import NodeKey
from tests.pools import certificates_backdated, make_pool

NUM_BLOCKS = 30
MODEL_HASH = "c0ffee00d15ea5e5"
FLOPS_PER_BLOCK_TOKEN = 1_750_000_000  # about a 70B model's block: credits come out in readable numbers
MEMBERS = ("alpha-university", "beta-lab", "gamma-institute")
COORDINATOR = "coop-coordinator"
XSS_NAME = "<script>alert(1)</script>"
REVOKED = "delta-retired"
# node id -> (institution, start, end, announced throughput in tokens/s)
LIVE_NODES = {
    "alpha-a100-0": ("alpha-university", 0, 12, 48.0),
    "beta-h100-0": ("beta-lab", 12, 24, 71.0),
    "gamma-l40-0": ("gamma-institute", 24, 30, 22.0),
    "beta-h100-1": ("beta-lab", 0, 16, 65.0),
    "gamma-l40-1": ("gamma-institute", 16, 30, 30.0),
}
LIVE_KEYS = [str(NodeKey(spec[0], node_id)) for node_id, spec in LIVE_NODES.items()]  # as the pages name them
PAUSED_NODE = "gamma-l40-1"  # its owner paused it (`coop node pause`): online, announced as paused
OFFLINE_NODE = ("alpha-old-0", "alpha-university", 0, 30)
ROUTES = [["alpha-a100-0", "beta-h100-0", "gamma-l40-0"], ["beta-h100-1", "gamma-l40-1"], [OFFLINE_NODE[0]]]
# the coordinator's sessions open now, each on its route: 3 sessions, 9 sessions on nodes
OPEN_ROUTES = [ROUTES[0], ROUTES[0], ["alpha-a100-0", "beta-h100-1", "gamma-l40-0"]]
SESSIONS = 36


class StaticSwarm:
    """A swarm view with fixed live nodes and open sessions: the admin view's `SwarmProvider`, without a DHT."""

    def __init__(self, num_blocks: int, nodes: list[NodeAnnouncement], open_routes: list[list[NodeKey]]) -> None:
        self.num_blocks = num_blocks
        self.nodes = nodes
        self.load = Counter(key for route in open_routes for key in route)
        self.sessions_open = len(open_routes)

    def live_nodes(self) -> list[NodeAnnouncement]:
        return list(self.nodes)


@dataclass
class AdminPool:
    pool: PoolInfo
    admin_token: str
    ledger: Ledger
    bundles: dict[str, MemberBundle]
    api_keys: dict[str, str]  # institution -> a live key
    swarm: StaticSwarm
    meter: TokenRateMeter
    fair_share: FairShare
    booked: list[str] = field(default_factory=list)

    def context(self) -> AdminContext:
        return AdminContext(
            pool_dir=self.pool.directory,
            ledger=self.ledger,
            swarm=self.swarm,
            fair_share=lambda name: self.fair_share.factor(name, time.time()),
            token_samples=self.meter.samples,
        )


def _span(node_id: str) -> tuple[str, int, int]:
    if node_id == OFFLINE_NODE[0]:
        return OFFLINE_NODE[1], OFFLINE_NODE[2], OFFLINE_NODE[3]
    institution, start, end, _ = LIVE_NODES[node_id]
    return institution, start, end


def build_admin_pool(root: Path, *, ledger_url: str | None = None, seed: int = 6) -> AdminPool:
    """`ledger_url`: default, SQLite in root."""
    rng = random.Random(seed)
    with certificates_backdated(dt.timedelta(hours=41)):  # the history below goes back 40 hours
        disk = make_pool(root / "pool", "Coop demo pool", (*MEMBERS, REVOKED), (COORDINATOR,), api_keys=MEMBERS)
        bundles = {name: MemberBundle.load(path) for name, path in disk.bundles.items()}
        nodes = {node_id: bundles[_span(node_id)[0]].credentials(node_id) for route in ROUTES for node_id in route}
    info, api_keys = disk.info, disk.keys
    create_api_key(info.directory, "alpha-university")  # a second key: revoking one leaves the other
    revoke_member(info.directory, REVOKED)

    ledger = Ledger.open(ledger_url or sqlite_url(root / "ledger.db"))
    checker = ReceiptChecker(
        pool_id=info.pool_id,
        ca_cert_pem=info.ca_cert_pem(),
        model_hash=MODEL_HASH,
        span_flops_per_token=lambda start, end: (end - start) * FLOPS_PER_BLOCK_TOKEN,
        signer=bundles[COORDINATOR],
        observation=ledger.observation,
        booked_for=ledger.booked_for,
    )
    admin = AdminSigner.load(info.directory)
    for name in MEMBERS:
        ledger.grant(name, 100, reason="sign-up credit", actor="admin (cli)", signer=admin)
    ledger.grant(XSS_NAME, 5, reason="a name that must render as text", actor="admin (cli)", signer=admin)

    now = time.time()
    booked: list[str] = []
    endings = sorted(now - rng.uniform(60, 40 * 3600) for _ in range(SESSIONS))  # booked in order, as live
    for index, ended in enumerate(endings):
        consumer = MEMBERS[index % len(MEMBERS)]
        route = ROUTES[0 if index % 3 else 1] if index >= 2 else ROUTES[2]  # the offline node served the oldest
        started = ended - rng.uniform(5, 90)
        prefill, decode = rng.randint(20, 400), rng.randint(10, 300)
        session_id = new_receipt_id()
        observations, bodies = [], []
        for node_id in route:
            provider, start, end = _span(node_id)
            observations.append(
                Observation(
                    session_id=session_id,
                    node_id=node_id,
                    provider=provider,
                    consumer=consumer,
                    start_block=start,
                    end_block=end,
                    prefill_tokens=prefill,
                    decode_tokens=decode,
                )
            )
            flops = (prefill + decode) * (end - start) * FLOPS_PER_BLOCK_TOKEN
            body = ReceiptBody(
                new_receipt_id(), info.pool_id, session_id, node_id, provider, COORDINATOR,
                MODEL_HASH, start, end, prefill, decode, flops, started, ended,
            )  # fmt: skip
            bodies.append(body)
        ledger.observe(observations)
        booked += ledger.book([checker.check(sign_receipt(nodes[b.node_id], b)) for b in bodies])

    fair_share = FairShare(now_s=now)
    fair_share.seed(
        (at.timestamp(), p, c, f) for at, p, c, f in ledger.flows_since(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    )
    meter = TokenRateMeter()
    for second in range(0, 900, 2):
        meter.add(int(40 + 25 * rng.random() + 20 * (second % 300 < 150)), at_s=now - 900 + second)
    return AdminPool(
        pool=PoolInfo.load(info.directory),
        admin_token=disk.admin_token,
        ledger=ledger,
        bundles=bundles,
        api_keys=api_keys,
        swarm=StaticSwarm(NUM_BLOCKS, _announcements(info.pool_id, bundles, now), _open_routes()),
        meter=meter,
        fair_share=fair_share,
        booked=booked,
    )


def _open_routes() -> list[list[NodeKey]]:
    return [[NodeKey(_span(node_id)[0], node_id) for node_id in route] for route in OPEN_ROUTES]


def _announcements(pool_id: str, bundles: dict[str, MemberBundle], now: float) -> list[NodeAnnouncement]:
    out = []
    for port, (node_id, (institution, start, end, tps)) in enumerate(LIVE_NODES.items(), start=31330):
        unsigned = NodeAnnouncement(
            node_id=node_id,
            pool_id=pool_id,
            model_hash=MODEL_HASH,
            start=start,
            end=end,
            endpoint=f"127.0.0.1:{port}",
            institution=institution,
            throughput_tps=tps,
            free_cache_bytes=2**30,
            state=PAUSED if node_id == PAUSED_NODE else SERVING,
            announced_at=now,
            expires_at=now + 9,
        )
        out.append(sign_announcement(bundles[institution].credentials(node_id), unsigned))
    return out


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page has a form with a CSRF token"
    return match.group(1)
