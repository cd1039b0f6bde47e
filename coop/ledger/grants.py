"""What only the pool admin decides: grants of credit and credit floors, signed with the pool CA key.

Whoever can write to the ledger database (a coordinator, someone with its password) could insert a
grant row and its postings; what they cannot do is sign it. Each grant and floor is stored with the
exact bytes the admin signed, and `coop ledger verify` checks every one against the pool CA
certificate, so a grant made anywhere but `coop ledger grant` (or the admin view) in the pool
directory makes the ledger fail verification.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from coop.errors import InvalidInput, Unauthorized
from coop.pool.ca import SIGNATURE_HASH, verify_signature

GRANT_FORMAT = "coop-grant/1"
FLOOR_FORMAT = "coop-credit-floor/1"
_GRANT_DOMAIN = b"coop-grant-v1\n"  # domain separation: never valid as a certificate or revocation list
_FLOOR_DOMAIN = b"coop-credit-floor-v1\n"
MAX_BODY_BYTES = 4096


@dataclass(frozen=True)
class GrantBody:
    grant_id: str
    pool_id: str
    institution: str
    flops: str  # decimal integer: exact at any size, whatever a JSON reader does with big numbers
    reason: str
    granted_by: str
    granted_at: float  # unix seconds

    @property
    def amount(self) -> int:
        return _integer(self.flops)


@dataclass(frozen=True)
class FloorBody:
    floor_id: str
    pool_id: str
    institution: str
    floor_flops: str | None  # decimal integer; None = no floor
    set_by: str
    set_at: float

    @property
    def amount(self) -> int | None:
        return None if self.floor_flops is None else _integer(self.floor_flops)


def _to_bytes(kind: str, body: GrantBody | FloorBody) -> bytes:
    doc = {"format": kind, **asdict(body)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _parse(data: bytes, kind: str) -> dict[str, Any]:
    if len(data) > MAX_BODY_BYTES:
        raise InvalidInput(f"a signed {kind} is at most {MAX_BODY_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"a signed {kind} must be JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.pop("format", None) != kind:
        raise InvalidInput(f"not a {kind} object")
    return doc


def _integer(text: object) -> int:
    if not isinstance(text, str) or not text.lstrip("-").isdigit():
        raise InvalidInput(f"an amount must be a decimal integer string, got {str(text)[:40]!r}")
    return int(text)


def parse_grant(data: bytes) -> GrantBody:
    doc = _parse(data, GRANT_FORMAT)
    _fields(doc, GrantBody, ("grant_id", "pool_id", "institution", "flops", "reason", "granted_by"), "granted_at")
    _integer(doc["flops"])
    return GrantBody(**doc)


def parse_floor(data: bytes) -> FloorBody:
    doc = _parse(data, FLOOR_FORMAT)
    _fields(doc, FloorBody, ("floor_id", "pool_id", "institution", "set_by"), "set_at")
    if doc["floor_flops"] is not None:
        _integer(doc["floor_flops"])
    return FloorBody(**doc)


def _fields(doc: dict[str, Any], cls: type[GrantBody | FloorBody], texts: tuple[str, ...], time_field: str) -> None:
    expected = {f.name for f in fields(cls)}
    if set(doc) != expected:
        raise InvalidInput(f"signed fields differ from {cls.__name__}'s: {sorted(set(doc) ^ expected)}")
    if not all(isinstance(doc[name], str) for name in texts):
        raise InvalidInput(f"{cls.__name__} fields {', '.join(texts)} must be text")
    if isinstance(doc[time_field], bool) or not isinstance(doc[time_field], int | float):
        raise InvalidInput(f"{cls.__name__} field {time_field} must be a time")


def grant_payload(body: bytes) -> bytes:
    return _GRANT_DOMAIN + body


def floor_payload(body: bytes) -> bytes:
    return _FLOOR_DOMAIN + body


def verify_admin_signature(ca_cert_pem: bytes, payload: bytes, signature: bytes, what: str) -> None:
    """Unauthorized unless the pool admin (the pool CA key) signed payload."""
    try:
        verify_signature(ca_cert_pem, payload, signature)
    except Unauthorized as exc:
        raise Unauthorized(f"{what} is not signed by the pool admin (the pool CA key)") from exc


@dataclass(frozen=True)
class Signed:
    body: bytes
    signature: bytes


class AdminSigner:
    """The pool admin's signing key (the pool CA key, read from the pool directory)."""

    def __init__(self, pool_id: str, key: ec.EllipticCurvePrivateKey) -> None:
        self.pool_id = pool_id
        self._key = key

    @classmethod
    def load(cls, pool_dir: Path | str) -> AdminSigner:
        from coop.pool.registry import PoolInfo, load_ca

        pool = PoolInfo.load(pool_dir)
        key, _ = load_ca(pool)
        return cls(pool.pool_id, key)

    def grant(self, institution: str, flops: int, *, reason: str, granted_by: str) -> tuple[GrantBody, Signed]:
        body = GrantBody(
            grant_id=uuid.uuid4().hex,
            pool_id=self.pool_id,
            institution=institution,
            flops=str(flops),
            reason=reason,
            granted_by=granted_by,
            granted_at=_now(),
        )
        data = _to_bytes(GRANT_FORMAT, body)
        return body, Signed(data, self._key.sign(grant_payload(data), ec.ECDSA(SIGNATURE_HASH)))

    def floor(self, institution: str, flops: int | None, *, set_by: str) -> tuple[FloorBody, Signed]:
        body = FloorBody(
            floor_id=uuid.uuid4().hex,
            pool_id=self.pool_id,
            institution=institution,
            floor_flops=None if flops is None else str(flops),
            set_by=set_by,
            set_at=_now(),
        )
        data = _to_bytes(FLOOR_FORMAT, body)
        return body, Signed(data, self._key.sign(floor_payload(data), ec.ECDSA(SIGNATURE_HASH)))


def _now() -> float:
    return dt.datetime.now(dt.UTC).timestamp()
