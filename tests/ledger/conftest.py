"""Ledger fixtures: every ledger test runs on SQLite and on a real PostgreSQL server, each with a fresh database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from coop.ledger.booking import ReceiptChecker
from coop.ledger.database import sqlite_url
from coop.ledger.grants import AdminSigner
from coop.ledger.models import Observation
from coop.ledger.store import Booking, Ledger
from coop.pool.bundle import MemberBundle
from coop.receipts import ReceiptBody, SignedReceipt, new_receipt_id, sign_receipt
from tests.pools import MemberPool

MODEL_HASH = "ab12"
FLOPS_PER_TOKEN_PER_BLOCK = 1000
COORDINATOR = "coord"


def span_flops_per_token(start_block: int, end_block: int) -> int:
    return (end_block - start_block) * FLOPS_PER_TOKEN_PER_BLOCK


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "ledger.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    opened = Ledger.open(ledger_url)
    try:
        yield opened
    finally:
        opened.close()


@dataclass
class Receipts:
    """Makes what a real session leaves behind: the coordinator's observation, the node's signed receipt."""

    pool: MemberPool
    ledger: Ledger

    def checker(self, ledger: Ledger | None = None, **overrides: Any) -> ReceiptChecker:
        fields: dict[str, Any] = {
            "pool_id": self.pool.pool_id,
            "ca_cert_pem": self.pool.info.ca_cert_pem(),
            "model_hash": MODEL_HASH,
            "span_flops_per_token": span_flops_per_token,
            "signer": self.pool[COORDINATOR],
            "observation": (ledger or self.ledger).observation,
            "booked_for": (ledger or self.ledger).booked_for,
        }
        return ReceiptChecker(**{**fields, **overrides})

    def observe(
        self,
        provider: str = "alpha",
        consumer: str = "beta",
        *,
        node_id: str = "n1",
        blocks: tuple[int, int] = (0, 10),
        prefill_tokens: int = 7,
        decode_tokens: int = 20,
        api_key_id: str = "",
        record: bool = True,
    ) -> Observation:
        """What the coordinator saw one node do in a new session; written to the ledger unless record=False."""
        seen = Observation(
            api_key_id=api_key_id,
            session_id=new_receipt_id(),
            node_id=node_id,
            provider=provider,
            consumer=consumer,
            start_block=blocks[0],
            end_block=blocks[1],
            prefill_tokens=prefill_tokens,
            decode_tokens=decode_tokens,
        )
        if record:
            self.ledger.observe([seen])
        return seen

    def body(self, seen: Observation, **overrides: Any) -> ReceiptBody:
        """The honest receipt for what was seen; overrides make it dishonest (flops follow the tokens)."""
        now = time.time()
        body = ReceiptBody(
            receipt_id=new_receipt_id(),
            pool_id=self.pool.pool_id,
            session_id=seen.session_id,
            node_id=seen.node_id,
            institution=seen.provider,
            coordinator=COORDINATOR,
            model_hash=MODEL_HASH,
            start_block=seen.start_block,
            end_block=seen.end_block,
            prefill_tokens=seen.prefill_tokens,
            decode_tokens=seen.decode_tokens,
            flops=0,
            started_at=now - 1,
            ended_at=now,
        )
        body = replace(body, **{k: v for k, v in overrides.items() if k != "flops"})
        flops = body.tokens * span_flops_per_token(body.start_block, body.end_block)
        return replace(body, flops=overrides.get("flops", flops))

    def sign(self, body: ReceiptBody, signer: MemberBundle | None = None) -> SignedReceipt:
        return sign_receipt((signer or self.pool[body.institution]).credentials(body.node_id), body)

    def booking(self, provider: str = "alpha", consumer: str = "beta", **observed: Any) -> Booking:
        """Observed, signed by the provider and checked: ready to book."""
        seen = self.observe(provider, consumer, **observed)
        return self.checker().check(self.sign(self.body(seen)))


@pytest.fixture
def receipts(member_pool: MemberPool, ledger: Ledger) -> Receipts:
    return Receipts(member_pool, ledger)


@pytest.fixture
def admin(member_pool: MemberPool) -> AdminSigner:
    """The pool admin's signing key: what `coop ledger grant` and `floor` sign with."""
    return AdminSigner.load(member_pool.directory)
