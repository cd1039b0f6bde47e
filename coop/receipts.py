"""Receipts: what a node computed for one batch of a session's steps, in a form nobody can alter unnoticed.

A node closes a batch every N tokens or T seconds, and the last one when the session ends (see
`coop.node.receipt_batches`); batches of one (session, node) are numbered 0, 1, 2, ... so a gap shows. For
each it writes a `ReceiptBody`, signs its canonical bytes with its member key
(`sign_receipt`) and keeps the result in its outbox until a coordinator acknowledges it. The
coordinator checks it (`coop.ledger.booking`) and countersigns the body's digest together with the
`Payment` it books: the consuming institution and the id of the API key that admitted the session
(which the node cannot know), and the tokens and FLOPs paid (the claim, or what the coordinator
observed if the claim was higher). Both signatures are stored with the exact signed bytes, so
`coop ledger verify` can recheck every booking later.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import uuid
from dataclasses import asdict, dataclass

from coop.errors import InvalidInput
from coop.pool.bundle import Credentials

RECEIPT_FORMAT = "coop-receipt/2"
_FORMAT_V1 = "coop-receipt/1"  # one receipt per session, no batch number: read as batch 0 (ledgers kept them)
_BODY_DOMAIN = b"coop-receipt-v1\n"
_COUNTERSIGN_DOMAIN = b"coop-countersign-v2\n"
MAX_BODY_BYTES = 4096
API_KEY_ID_CHARS = 16  # hex digits of an API key's sha256 that name it in observations and receipts
MAX_TIME_S = 1e11  # unix seconds: year 5138; keeps datetimes and decay arithmetic finite
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_HEX = re.compile(r"^[0-9a-f]{1,128}$")
_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")  # institution names: free text, no control characters


@dataclass(frozen=True)
class ReceiptBody:
    receipt_id: str
    pool_id: str
    session_id: str
    node_id: str
    institution: str  # the provider: the node's institution, as its certificate says
    coordinator: str  # who opened the session: the peer's institution (or address in development)
    model_hash: str
    start_block: int
    end_block: int
    prefill_tokens: int  # split as TokenTally splits them
    decode_tokens: int
    flops: int  # (prefill + decode) x the manifest's FLOPs per token of blocks [start, end)
    started_at: float  # unix seconds: when the batch's first step was computed
    ended_at: float  # when the batch closed
    batch: int = 0  # its sequence number within the node's part of the session: 0, 1, 2, ...

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    def to_bytes(self) -> bytes:
        doc = {"format": RECEIPT_FORMAT, **asdict(self)}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> ReceiptBody:
        """Parse and validate; InvalidInput says what is wrong."""
        if len(data) > MAX_BODY_BYTES:
            raise InvalidInput(f"a receipt body is at most {MAX_BODY_BYTES} bytes")
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"a receipt body must be JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") not in (RECEIPT_FORMAT, _FORMAT_V1):
            raise InvalidInput(f"a receipt body must be a {RECEIPT_FORMAT} object")
        expected = set(cls.__dataclass_fields__) - ({"batch"} if doc.pop("format") == _FORMAT_V1 else set())
        if set(doc) != expected:
            raise InvalidInput(f"receipt fields differ from {RECEIPT_FORMAT}: {sorted(set(doc) ^ expected)}")
        body = cls(**doc)
        body.validate()
        return body

    def validate(self) -> None:
        for name in ("receipt_id", "pool_id", "session_id", "node_id"):
            _require(isinstance(getattr(self, name), str) and _ID.match(getattr(self, name)), name, "an id")
        for name in ("institution", "coordinator"):
            _require(isinstance(getattr(self, name), str) and _NAME.match(getattr(self, name)), name, "a name")
        _require(isinstance(self.model_hash, str) and _HEX.match(self.model_hash), "model_hash", "hex")
        for name in ("start_block", "end_block", "prefill_tokens", "decode_tokens", "flops", "batch"):
            value = getattr(self, name)
            _require(type(value) is int and 0 <= value < 2**62, name, "a non-negative integer")
        _require(self.start_block < self.end_block, "end_block", "greater than start_block")
        for name in ("started_at", "ended_at"):
            value = getattr(self, name)
            _require(type(value) in (int, float) and math.isfinite(value) and 0 <= value < MAX_TIME_S, name, "a time")
        _require(self.started_at <= self.ended_at, "ended_at", "not before started_at")

    @property
    def started(self) -> dt.datetime:
        return _utc(self.started_at)

    @property
    def ended(self) -> dt.datetime:
        return _utc(self.ended_at)


@dataclass(frozen=True)
class SignedReceipt:
    body: bytes
    signature: bytes  # ECDSA/SHA-256 by the node's member key over _BODY_DOMAIN + body
    cert_pem: bytes  # the signer's member certificate


@dataclass
class TokenTally:
    """A session's tokens, split the way receipts bill them. Nodes count what they computed and the
    coordinator what it sent, both with this one rule, so that the two can be compared."""

    prefill: int = 0  # tokens of multi-token steps: prompts, replays after a failover
    decode: int = 0  # one-token steps

    def add(self, step_tokens: int) -> None:
        if step_tokens == 1:
            self.decode += 1
        else:
            self.prefill += step_tokens

    @property
    def total(self) -> int:
        return self.prefill + self.decode


def new_receipt_id() -> str:
    return uuid.uuid4().hex


def body_payload(body: bytes) -> bytes:
    return _BODY_DOMAIN + body


def sign_receipt(bundle: Credentials, body: ReceiptBody) -> SignedReceipt:
    data = body.to_bytes()
    return SignedReceipt(data, bundle.sign(body_payload(data)), bundle.cert_pem)


@dataclass(frozen=True)
class Payment:
    """What a coordinator books for a receipt, and countersigns."""

    consumer: str  # the institution charged: the owner of the API key
    api_key_id: str  # the key that admitted the session (`api_key_id`); "" = none, the coordinator's own
    prefill_tokens: int  # paid: never more than the coordinator observed
    decode_tokens: int
    flops: int


def api_key_id(key_digest: str) -> str:
    """The id of an API key in the ledger: a prefix of its sha256, never the key."""
    return key_digest[:API_KEY_ID_CHARS]


def countersign_payload(body: bytes, payment: Payment) -> bytes:
    """What the coordinator signs: this exact body, paid this much, by this consumer through this key."""
    terms = [payment.consumer, payment.api_key_id, payment.prefill_tokens, payment.decode_tokens, payment.flops]
    return _COUNTERSIGN_DOMAIN + hashlib.sha256(body).digest() + json.dumps(terms, ensure_ascii=False).encode()


def cert_sha256(cert_pem: bytes) -> str:
    return hashlib.sha256(cert_pem.strip()).hexdigest()


def _require(ok: object, field: str, what: str) -> None:
    if not ok:
        raise InvalidInput(f"receipt field {field} must be {what}")


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)
