"""The coordinator's share of the ledger: metering, fair share, admission, receipt collection.

Only a coordinator with a member bundle keeps accounts: receipts are signed by members and
countersigned by the coordinator, which needs keys. A development coordinator serves without.
The ledger's URL never comes from the bundle (members must not hold it): see
`coop.ledger.database.ledger_location`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coop.config import CoordinatorSettings
from coop.coordinator.accounts.fair_share_admission import FairShareAdmission, RequestAdmission
from coop.coordinator.accounts.observations import Metering
from coop.coordinator.accounts.receipt_collection import ReceiptCollector
from coop.ledger.booking import ReceiptChecker
from coop.ledger.database import ledger_location, safe_url
from coop.ledger.fairshare import FairShare
from coop.ledger.store import Ledger
from coop.model.manifest import Manifest
from coop.pool.bundle import MemberBundle
from coop.pool.revocation import Revocations
from coop.swarm.announcement import NodeAnnouncement
from coop.wire.channels import ChannelPool

log = logging.getLogger(__name__)

SEED_HALF_LIVES = 10  # older flows weigh under 0.1% and are not read at start


def ledger_url(settings: CoordinatorSettings) -> str:
    """Without a pool directory, a SQLite ledger goes next to the member bundle."""
    if settings.pool_dir is not None:
        return ledger_location(settings.ledger_url, settings.pool_dir)
    assert settings.member_bundle is not None
    return ledger_location(settings.ledger_url, settings.member_bundle.parent, pool_dir=False)


@dataclass
class Bookkeeping:
    ledger: Ledger
    fair_share: FairShare
    metering: Metering
    access: RequestAdmission
    collector: ReceiptCollector
    _tasks: tuple[asyncio.Task[None], ...] = ()

    @classmethod
    async def start(
        cls,
        settings: CoordinatorSettings,
        bundle: MemberBundle,
        revocations: Revocations,
        manifests: Sequence[Manifest],
        channels: Callable[[], ChannelPool],
        nodes: Callable[[], Sequence[NodeAnnouncement]],
    ) -> Bookkeeping:
        """`manifests`: of every model served, the default first; `nodes`: the live nodes of them all."""
        manifest = manifests[0]
        url = ledger_url(settings)
        ledger = await asyncio.to_thread(Ledger.open, url)
        now = time.time()
        fair_share = FairShare(settings.fair_share_half_life_s, now_s=now)
        since = dt.datetime.fromtimestamp(now - SEED_HALF_LIVES * settings.fair_share_half_life_s, dt.UTC)
        flows = await asyncio.to_thread(ledger.flows_since, since)
        fair_share.seed((at.timestamp(), provider, consumer, flops) for at, provider, consumer, flops in flows)
        metering = Metering(
            fair_share,
            manifest.span_flops_per_token,
            model_rates={m.content_hash: m.span_flops_per_token for m in manifests},
            checkpoint_tokens=settings.observation_checkpoint_tokens,
            checkpoint_s=settings.observation_checkpoint_s,
        )
        admission = FairShareAdmission(settings.max_active_sessions, lambda: fair_share.factors(time.time()))
        access = RequestAdmission(
            admission,
            default_consumer=bundle.institution,
            credit_state=ledger.credit_state,
            priority=lambda consumer: fair_share.factor(consumer, time.time()),
            meter=metering,
        )
        checker = ReceiptChecker(
            pool_id=bundle.pool_id,
            ca_cert_pem=bundle.ca_cert_pem,
            model_hash=manifest.content_hash,
            span_flops_per_token=manifest.span_flops_per_token,
            signer=bundle,
            observation=ledger.observation,
            booked_for=ledger.booked_for,
            revoked_since=revocations.revoked_since,
            live=metering.live,
            other_models={m.content_hash: m.span_flops_per_token for m in manifests[1:]},
        )
        collector = ReceiptCollector(
            ledger,
            checker,
            metering,
            channels,
            nodes,
            interval_s=settings.receipt_interval_s,
            batch=settings.receipt_batch,
            poll_budget_s=settings.receipt_poll_budget_s,
            max_concurrent_polls=settings.receipt_max_concurrent_polls,
            audit_interval_s=settings.receipt_audit_interval_s,
            max_backoff_rounds=settings.receipt_max_backoff_rounds,
        )
        bookkeeping = cls(ledger, fair_share, metering, access, collector)
        bookkeeping._tasks = (
            asyncio.create_task(collector.run()),
            asyncio.create_task(collector.write_observations()),
        )
        log.info("ledger at %s; fair share seeded from %d receipts", safe_url(url), len(flows))
        return bookkeeping

    async def close(self) -> None:
        """Stop collecting, then write down what was seen so the next start can book the rest."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.collector.flush_observations)
        await asyncio.to_thread(self.collector.close)
        await asyncio.to_thread(self.ledger.close)
