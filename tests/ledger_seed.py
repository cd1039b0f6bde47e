"""Signed receipts and the matching observations, made the way a node and a coordinator make them; and
a grant written straight into the database, the way someone with its password could."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlmodel import Session

from coop.ledger.amounts import split
from coop.ledger.models import POOL_ACCOUNT, Grant, Observation, Posting
from coop.ledger.store import Ledger
from coop.pool.bundle import MemberBundle
from coop.receipts import ReceiptBody, SignedReceipt, new_receipt_id, sign_receipt


@dataclass(frozen=True)
class SeededReceipt:
    body: ReceiptBody
    signed: SignedReceipt
    observation: Observation


def seeded_receipts(
    provider: MemberBundle,
    *,
    coordinator: str,
    consumer: str,
    model_hash: str,
    node_id: str,
    span: tuple[int, int],
    flops_per_token: int,
    count: int,
    prefill_tokens: int = 5,
    decode_tokens: int = 3,
    ended_at: float | None = None,
    api_key_id: str = "",
) -> list[SeededReceipt]:
    """`count` sessions of one node, each with its own session id, receipt and observation (of a request
    admitted by the API key of `api_key_id`, "" = none)."""
    ended = ended_at if ended_at is not None else time.time()
    out = []
    for i in range(count):
        session_id = f"seed-{new_receipt_id()[:12]}-{i}"
        body = ReceiptBody(
            receipt_id=new_receipt_id(),
            pool_id=provider.pool_id,
            session_id=session_id,
            node_id=node_id,
            institution=provider.institution,
            coordinator=coordinator,
            model_hash=model_hash,
            start_block=span[0],
            end_block=span[1],
            prefill_tokens=prefill_tokens,
            decode_tokens=decode_tokens,
            flops=(prefill_tokens + decode_tokens) * flops_per_token,
            started_at=ended - 1.0,
            ended_at=ended,
        )
        observation = Observation(
            session_id=session_id,
            node_id=node_id,
            provider=provider.institution,
            consumer=consumer,
            start_block=span[0],
            end_block=span[1],
            prefill_tokens=prefill_tokens,
            decode_tokens=decode_tokens,
            api_key_id=api_key_id,
        )
        out.append(SeededReceipt(body, sign_receipt(provider.credentials(node_id), body), observation))
    return out


def insert_grant(ledger: Ledger, institution: str, flops: int, body: bytes, signature: bytes, grant_id: str) -> None:
    """A grant and its postings written straight into the database, bypassing `Ledger.grant` and its signer."""
    hi, lo = split(flops)
    with Session(ledger.engine) as session, session.begin():
        session.add(
            Grant(
                grant_id=grant_id,
                institution=institution,
                amount_hi=hi,
                amount_lo=lo,
                reason="sign-up credit",
                granted_by="admin (cli)",
                body=body,
                signature=signature,
            )
        )
        session.flush()
        for account, amount in ((institution, flops), (POOL_ACCOUNT, -flops)):
            hi, lo = split(amount)
            session.add(Posting(account=account, amount_hi=hi, amount_lo=lo, grant_id=grant_id))
