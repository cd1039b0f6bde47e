"""Receipts on the wire: `coop.receipts.SignedReceipt` <-> the `SignedReceipt` protobuf message."""

from __future__ import annotations

from coop.receipts import SignedReceipt
from coop.wire.generated import coop_pb2 as pb


def receipt_to_proto(receipt_id: str, receipt: SignedReceipt) -> pb.SignedReceipt:
    return pb.SignedReceipt(
        receipt_id=receipt_id, body=receipt.body, signature=receipt.signature, certificate_pem=receipt.cert_pem
    )


def receipt_from_proto(message: pb.SignedReceipt) -> SignedReceipt:
    """The signed bytes exactly as the node sent them; checking them is the booking's job."""
    return SignedReceipt(body=message.body, signature=message.signature, cert_pem=message.certificate_pem)
