"""Whom the coordinator dials: only endpoints of validly signed announcements of unrevoked members.

The directory's read path, the swarm view, its pings and the receipt collector are the real ones;
the DHT under them is a fake that returns whatever records "peers" stored, signed or not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path
from typing import Any

from hivemind.utils.timed_storage import ValueWithExpiration

from coop.coordinator.accounts.observations import Metering
from coop.coordinator.accounts.receipt_collection import ReceiptCollector
from coop.ledger.database import sqlite_url
from coop.ledger.fairshare import FairShare
from coop.ledger.store import Ledger
from coop.pool.membership import Membership
from coop.pool.registry import COORDINATORS_DIR, PoolInfo, read_revocations, revoke_member
from coop.swarm.announcement import NodeAnnouncement, announcement_validator, stamp_announcement
from coop.swarm.directory import SwarmDirectory
from coop.swarm.node_key import NodeKey
from coop.swarm.view import SwarmView
from coop.wire.generated import coop_pb2 as pb
from tests.ledger.conftest import MODEL_HASH, Receipts, span_flops_per_token
from tests.pools import MemberPool, make_member_pool

SIGNED = "member.test:4001"


class FakeDHT:
    """What a `get` of the directory key returns: every record some peer stored, as given, each under the
    subkey its own record names."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def is_alive(self) -> bool:
        return True

    def get(self, key: str, latest: bool, return_future: bool) -> concurrent.futures.Future[Any]:
        expires = time.time() + 60
        entries = {
            str(NodeKey(record["institution"], record["node_id"])): ValueWithExpiration(record, expires)
            for record in self.records
        }
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_result(ValueWithExpiration(entries, expires))
        return future


class Dialler:
    """Records every endpoint the collector asks a stub for; the nodes have no receipts."""

    def __init__(self) -> None:
        self.dialled: set[str] = set()

    def stub(self, endpoint: str, institution: str, node_id: str) -> Dialler:
        self.dialled.add(endpoint)
        return self

    async def Receipts(self, request: pb.ReceiptsRequest, timeout: float) -> pb.ReceiptBatch:
        return pb.ReceiptBatch()


def records(pool: MemberPool) -> list[dict[str, Any]]:
    """One node of each kind a reader meets in the DHT, each at its own endpoint."""

    def fields(node_id: str, institution: str, endpoint: str) -> dict[str, Any]:
        return {
            "node_id": node_id,
            "pool_id": pool.pool_id,
            "model_hash": MODEL_HASH,
            "start": 0,
            "end": 10,
            "endpoint": endpoint,
            "institution": institution,
            "throughput_tps": 1e6,
            "free_cache_bytes": 1 << 30,
        }

    def stamped(node_id: str, institution: str, endpoint: str, signer: str | None) -> NodeAnnouncement:
        bundle = None if signer is None else pool[signer].credentials(node_id)
        return stamp_announcement(fields(node_id, institution, endpoint), now=time.time(), ttl_s=60, bundle=bundle)

    impostor = stamped("impostor", "beta", "impostor.test:4003", "beta").to_wire()
    return [
        stamped("member", "alpha", SIGNED, "alpha").to_wire(),
        stamped("unsigned", "alpha", "unsigned.test:4002", None).to_wire(),
        {**impostor, "institution": "alpha"},  # beta's signature over another institution's record
        stamped("revoked", "gamma", "revoked.test:4004", "gamma").to_wire(),
    ]


def dialled_by_the_coordinator(pool: MemberPool, membership: Membership, tmp_path: Path) -> tuple[set[str], set[str]]:
    """(endpoints pinged, endpoints polled for receipts) by a coordinator's view of these records."""
    pinged: set[str] = set()

    async def ping(node: NodeAnnouncement) -> float:
        pinged.add(node.endpoint)
        return 0.001

    async def scenario() -> set[str]:
        directory = SwarmDirectory(FakeDHT(records(pool)))  # type: ignore[arg-type]
        view = SwarmView(
            directory,
            pool_id=pool.pool_id,
            model_hash=MODEL_HASH,
            num_blocks=10,
            validator=announcement_validator(membership),
            revoked=membership.revocations,
            ping=ping,
        )
        await view.start()
        await view.stop()
        ledger = Ledger.open(sqlite_url(tmp_path / "ledger.db"))
        try:
            checker = Receipts(pool, ledger).checker()
            dialler = Dialler()
            metering = Metering(FairShare(), span_flops_per_token)
            collector = ReceiptCollector(ledger, checker, metering, lambda: dialler, view.live_nodes)
            await collector.collect_once()
            return dialler.dialled
        finally:
            ledger.close()

    polled = asyncio.run(scenario())
    return pinged, polled


def test_in_a_pool_only_signed_announcements_of_unrevoked_members_are_dialled(tmp_path: Path) -> None:
    pool = make_member_pool(tmp_path / "pool", members=("alpha", "beta", "gamma", "coord"))
    revoke_member(pool.directory, "gamma")
    membership = Membership.load(pool.directory / COORDINATORS_DIR / "coord.bundle")
    assert membership.revocations.offer(read_revocations(PoolInfo.load(pool.directory)))

    pinged, polled = dialled_by_the_coordinator(pool, membership, tmp_path)

    assert pinged == polled == {SIGNED}


def test_in_development_mode_every_announced_endpoint_is_dialled(tmp_path: Path) -> None:
    """The one exception: without a pool there is no signature to check (plaintext, on a trusted network)."""
    pool = make_member_pool(tmp_path / "pool", members=("alpha", "beta", "gamma", "coord"))
    development = Membership.load(None, pool_id=pool.pool_id)

    pinged, polled = dialled_by_the_coordinator(pool, development, tmp_path)

    assert pinged == polled == {SIGNED, "unsigned.test:4002", "impostor.test:4003", "revoked.test:4004"}
