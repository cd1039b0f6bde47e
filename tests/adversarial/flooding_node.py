"""`python -m tests.adversarial.flooding_node node start …`: Coop's own node, burying its coordinator in receipts.

It serves and computes honestly and hands out its real receipts, but every answer to the
coordinator's Receipts call also carries `JUNK` receipts, whatever number was asked for: forged
signatures, receipts signed (with the member's own certificates) for node ids it does not run,
FLOPs that do not follow from the tokens, bills for another coordinator, ids that differ from the
body's, bills for sessions that never were, and an inflated second bill for each real session.
Every other answer comes only after `DAWDLE_S`, as from a node that wants to hold collection up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import sys
import time
from pathlib import Path

import grpc

from coop.node.service import NodeService
from coop.pool.bundle import MemberBundle
from coop.receipts import ReceiptBody, SignedReceipt, new_receipt_id, sign_receipt
from coop.wire.generated import coop_pb2 as pb
from coop.wire.receipts import receipt_to_proto

JUNK = 2000
DAWDLE_S = 30.0
GHOSTS = 5  # node ids of Mallory's that no announcement lists

_honest_receipts = NodeService.Receipts
_calls = itertools.count()
_junk: list[pb.SignedReceipt] = []


def _member() -> MemberBundle:
    return MemberBundle.load(Path(sys.argv[sys.argv.index("--member") + 1]))


def _make_junk(node: NodeService, coordinator: str) -> list[pb.SignedReceipt]:
    assert node.receipts.writer is not None
    writer = node.receipts.writer
    member = _member()
    ghosts = [member.credentials(f"ghost-{i}") for i in range(GHOSTS)]
    flops_per_token = writer.manifest.span_flops_per_token(node.engine.start, node.engine.end)
    now = time.time()
    junk = []
    for i in range(JUNK):
        body = ReceiptBody(
            receipt_id=new_receipt_id(),
            pool_id=member.pool_id,
            session_id=f"never-{i}",
            node_id=node.node_id,
            institution=member.institution,
            coordinator=coordinator,
            model_hash=writer.manifest.content_hash,
            start_block=node.engine.start,
            end_block=node.engine.end,
            prefill_tokens=5,
            decode_tokens=3,
            flops=8 * flops_per_token,
            started_at=now - 1,
            ended_at=now,
        )
        signer, sent_as = writer.bundle, body.receipt_id
        match i % 6:
            case 0:  # forged: another body's signature
                signed = sign_receipt(signer, body)
                other = sign_receipt(signer, dataclasses.replace(body, decode_tokens=4, flops=9 * flops_per_token))
                junk.append(receipt_to_proto(sent_as, SignedReceipt(signed.body, other.signature, signed.cert_pem)))
                continue
            case 1:  # for a node it does not announce
                signer = ghosts[i % GHOSTS]
                body = dataclasses.replace(body, node_id=f"ghost-{i % GHOSTS}")
            case 2:
                body = dataclasses.replace(body, flops=10**15)
            case 3:
                body = dataclasses.replace(body, coordinator="Nobody")
            case 4:
                sent_as = new_receipt_id()
            case _:  # a million tokens of a session the coordinator never opened
                body = dataclasses.replace(body, decode_tokens=10**6, flops=(5 + 10**6) * flops_per_token)
        junk.append(receipt_to_proto(sent_as, sign_receipt(signer, body)))
    return junk


def _inflated(node: NodeService, receipt: pb.SignedReceipt) -> pb.SignedReceipt:
    """A second bill for a real session, for a thousand times its tokens."""
    writer = node.receipts.writer
    assert writer is not None
    body = ReceiptBody.from_bytes(receipt.body)
    tokens = 1000 * body.tokens
    flops = tokens * writer.manifest.span_flops_per_token(body.start_block, body.end_block)
    decode = tokens - body.prefill_tokens
    body = dataclasses.replace(body, receipt_id=new_receipt_id(), decode_tokens=decode, flops=flops)
    return receipt_to_proto(body.receipt_id, sign_receipt(writer.bundle, body))


async def flooding_receipts(
    node: NodeService, request: pb.ReceiptsRequest, context: grpc.aio.ServicerContext
) -> pb.ReceiptBatch:
    if next(_calls) % 2 == 1:
        await asyncio.sleep(DAWDLE_S)
    honest = await _honest_receipts(node, request, context)
    if not _junk:
        coordinator = await node._caller(context)
        _junk.extend(await asyncio.to_thread(_make_junk, node, coordinator))
    inflated = [_inflated(node, receipt) for receipt in honest.receipts]
    return pb.ReceiptBatch(receipts=[*honest.receipts, *inflated, *random.sample(_junk, len(_junk))])


if __name__ == "__main__":
    from coop.cli import app

    NodeService.Receipts = flooding_receipts  # type: ignore[method-assign, assignment]
    app(prog_name="coop")
