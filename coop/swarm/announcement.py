"""A node's announcement: the record it keeps in the DHT, how it is signed, and how readers check it.

The record is built and stamped once (`stamp_announcement`): fields, times, the node's certificate
chain and a signature over all of them. Readers keep only records the pool CA vouches for
(`AnnouncementVerifier`): the valid, unrevoked node certificate of exactly the announced node and
institution, that signed exactly these field values. A node that leaves replaces its record with a
`Withdrawal`, signed the same way, so that nobody else can hide it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import re
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any, Final, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from coop.errors import InvalidInput, Unauthorized
from coop.pool.bundle import Credentials
from coop.pool.ca import ROLE_NODE, load_cert, verify_signature
from coop.pool.identity import verify_identity
from coop.pool.membership import Membership

logger = logging.getLogger(__name__)

_ANNOUNCEMENT_DOMAIN = b"coop-announcement-v1\n"  # domain separation: never valid as another signature
_WITHDRAWAL_DOMAIN = b"coop-withdrawal-v1\n"

_ID = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_NON_NEGATIVE_FLOAT = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
_TIMESTAMP = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]

# Whether a node takes new sessions (coop/node/drain.py): routes are built from serving nodes only.
NodeState = Literal["serving", "paused", "draining"]
MAX_ANNOUNCED_SESSIONS: Final = 65536
SERVING: Final = "serving"
PAUSED: Final = "paused"
DRAINING: Final = "draining"


def check_endpoint(endpoint: str) -> str:
    """Accept ``host:port`` with an IPv4 address, a hostname, or a bracketed IPv6 address."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host:
        raise ValueError(f"endpoint must be host:port, got {endpoint[:80]!r}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"endpoint port must be 1..65535, got {port[:16]!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise ValueError(f"endpoint has an invalid IPv6 host {host[:80]!r}") from exc
    elif not _HOSTNAME.match(host):
        raise ValueError(f"endpoint host {host[:80]!r} is not an IPv4 address, hostname or [IPv6]")
    return endpoint


class NodeAnnouncement(BaseModel):
    """What a node tells the swarm about itself: which blocks it serves, where, and how fast.

    Strict and frozen because it arrives from untrusted peers: no coercion ("3" is not 3), no extra
    fields, no NaN, and a parsed announcement cannot be altered after validation (a later signature
    check must see exactly what was validated).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    node_id: _ID
    pool_id: _ID
    model_hash: _ID
    start: Annotated[int, Field(ge=0)]
    end: Annotated[int, Field(gt=0)]
    endpoint: Annotated[str, StringConstraints(min_length=3, max_length=262)]
    institution: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    throughput_tps: _NON_NEGATIVE_FLOAT
    free_cache_bytes: Annotated[int, Field(ge=0, le=2**63 - 1)]
    state: NodeState = SERVING
    # sessions open on the node now: the demand signal rebalancing reads (coop.swarm.rebalance), capped
    # here and read there as a median over blocks, so one peer's claim cannot make a model look busy
    active_sessions: Annotated[int, Field(ge=0, le=MAX_ANNOUNCED_SESSIONS)] = 0
    announced_at: _TIMESTAMP
    expires_at: _TIMESTAMP
    signature: Annotated[bytes, Field(max_length=8192)] = b""
    certificate: Annotated[bytes, Field(max_length=65536)] = b""

    @model_validator(mode="after")
    def _check(self) -> NodeAnnouncement:
        if not self.start < self.end:
            raise ValueError(f"span must satisfy 0 <= start < end, got [{self.start}, {self.end})")
        if not self.expires_at > self.announced_at:
            raise ValueError("expires_at must be later than announced_at")
        if not self.institution.isprintable():
            raise ValueError("institution must be printable text")
        check_endpoint(self.endpoint)
        return self

    def to_wire(self) -> dict[str, str | int | float | bytes]:
        """A plain dict of str/int/float/bytes that msgpack (and hence the DHT) can carry."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    @classmethod
    def from_wire(cls, obj: object) -> NodeAnnouncement:
        """Parse what a peer stored; raise InvalidInput on anything malformed, never anything else.

        Unknown keys are ignored so that a newer node may add fields without hiding itself from
        older readers.
        """
        if not isinstance(obj, Mapping):
            raise InvalidInput(f"node announcement must be a map, got {type(obj).__name__}")
        try:
            known = {key: value for key, value in obj.items() if key in cls.model_fields}
            return cls.model_validate(known)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in err['loc']) or 'record'}: {err['msg']}" for err in exc.errors()[:5]
            )
            raise InvalidInput(f"malformed node announcement: {problems}") from exc
        except Exception as exc:  # garbage from a peer must never crash a reader
            raise InvalidInput(f"malformed node announcement: {type(exc).__name__}") from exc


_ADDED_FIELDS = frozenset({"state", "active_sessions"})


def _payload(
    fields: Mapping[str, Any], model: type[BaseModel] = NodeAnnouncement, domain: bytes = _ANNOUNCEMENT_DOMAIN
) -> bytes:
    """Canonical bytes of every field of model but the signature (certificate included, so it is bound too).

    JSON with sorted keys; bytes as base64; float fields always as floats, so an int that a peer's
    msgpack round trip keeps as an int cannot change the encoding. A field added later (`_ADDED_FIELDS`)
    is covered only when it differs from its default: a serving node's record signs the same bytes as
    before the field existed, so nodes and readers of both versions still check each other's records.
    """
    doc: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name == "signature":
            continue
        if name in _ADDED_FIELDS and fields.get(name, info.default) == info.default:
            continue
        value = fields[name]
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        elif info.annotation is float:
            value = float(value)
        doc[name] = value
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return domain + body.encode("utf-8")


def announcement_payload(ann: NodeAnnouncement) -> bytes:
    """The bytes an announcement's signature covers."""
    return _payload(ann.to_wire())


def _signed_fields(
    bundle: Credentials, fields: Mapping[str, Any], payload: Callable[[Mapping[str, Any]], bytes] = _payload
) -> dict[str, Any]:
    if fields["pool_id"] != bundle.pool_id or fields["institution"] != bundle.institution:
        raise InvalidInput(
            f"cannot sign a record of {fields['institution']!r} in pool {fields['pool_id']!r} "
            f"with the credentials of {bundle.institution!r} in pool {bundle.pool_id!r}"
        )
    doc = {**fields, "certificate": bundle.cert_pem, "signature": b""}
    return {**doc, "signature": bundle.sign(payload(doc))}


def stamp_announcement(
    fields: Mapping[str, Any], *, now: float, ttl_s: float, bundle: Credentials | None = None
) -> NodeAnnouncement:
    """The one place a record is made: fields, announced now for ttl_s, signed with bundle when given.

    `fields` are the node's own (node_id, pool_id, model_hash, start, end, endpoint, institution,
    throughput_tps, free_cache_bytes, and state unless serving); times, certificate and signature are set here.
    """
    doc = {**fields, "announced_at": now, "expires_at": now + ttl_s, "certificate": b"", "signature": b""}
    return NodeAnnouncement.model_validate(doc if bundle is None else _signed_fields(bundle, doc))


def sign_announcement(bundle: Credentials, ann: NodeAnnouncement) -> NodeAnnouncement:
    """A copy of ann carrying bundle's certificate and a signature over everything else."""
    return NodeAnnouncement.model_validate(_signed_fields(bundle, ann.to_wire()))


# ------------------------------------------------------------------------------------------ withdrawals


class Withdrawal(BaseModel):
    """A signed tombstone: node_id no longer serves (pool_id, model_hash), until expires_at.

    hivemind cannot delete a record, only replace it with one expiring later; this is that
    replacement. It is signed like an announcement so that only the node's own identity can hide it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    withdrawn: Literal[True] = True  # tells it apart from a NodeAnnouncement on the wire
    node_id: _ID
    pool_id: _ID
    model_hash: _ID
    institution: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    withdrawn_at: _TIMESTAMP
    expires_at: _TIMESTAMP
    signature: Annotated[bytes, Field(max_length=8192)] = b""
    certificate: Annotated[bytes, Field(max_length=65536)] = b""

    @model_validator(mode="after")
    def _check(self) -> Withdrawal:
        if not self.expires_at > self.withdrawn_at:
            raise ValueError("expires_at must be later than withdrawn_at")
        return self

    def to_wire(self) -> dict[str, str | int | float | bytes | bool]:
        return {name: getattr(self, name) for name in type(self).model_fields}

    @classmethod
    def from_wire(cls, obj: object) -> Withdrawal:
        """Parse what a peer stored; InvalidInput on anything malformed, never anything else."""
        if not is_withdrawal(obj):
            raise InvalidInput("not a withdrawal record")
        try:
            return cls.model_validate(obj)
        except Exception as exc:  # garbage from a peer must never crash a reader
            raise InvalidInput(f"malformed withdrawal: {type(exc).__name__}") from exc


def is_withdrawal(obj: object) -> bool:
    """Whether a DHT value is meant as a Withdrawal (the reader still has to parse and check it)."""
    return isinstance(obj, Mapping) and obj.get("withdrawn") is True


def _withdrawal_payload(fields: Mapping[str, Any]) -> bytes:
    return _payload(fields, Withdrawal, _WITHDRAWAL_DOMAIN)


def withdrawal_payload(withdrawal: Withdrawal) -> bytes:
    """The bytes a withdrawal's signature covers."""
    return _withdrawal_payload(withdrawal.to_wire())


def stamp_withdrawal(
    ann: NodeAnnouncement, *, now: float, expires_at: float, bundle: Credentials | None = None
) -> Withdrawal:
    """The tombstone of ann's node, made at now until expires_at, signed with bundle when given."""
    doc: dict[str, Any] = {
        "withdrawn": True,
        "node_id": ann.node_id,
        "pool_id": ann.pool_id,
        "model_hash": ann.model_hash,
        "institution": ann.institution,
        "withdrawn_at": now,
        "expires_at": expires_at,
        "certificate": b"",
        "signature": b"",
    }
    return Withdrawal.model_validate(doc if bundle is None else _signed_fields(bundle, doc, _withdrawal_payload))


# -------------------------------------------------------------------------------------------- readers


class SignedRecord(Protocol):
    """What identifies the signer of a node's record (NodeAnnouncement and Withdrawal both have it)."""

    @property
    def node_id(self) -> str: ...
    @property
    def pool_id(self) -> str: ...
    @property
    def institution(self) -> str: ...
    @property
    def certificate(self) -> bytes: ...
    @property
    def signature(self) -> bytes: ...


class AnnouncementVerifier:
    """``list_nodes(validator=AnnouncementVerifier(...))``: keep only announcements the pool CA vouches for.

    An announcement passes if its certificate chain is a valid, unrevoked node certificate of this
    pool for exactly the announced node and institution, and signed exactly these field values.
    """

    def __init__(self, ca_cert_pem: bytes, pool_id: str, revoked: Callable[[], Collection[str]] = tuple) -> None:
        try:
            load_cert(ca_cert_pem, "pool CA certificate")
        except Unauthorized as exc:
            raise InvalidInput(str(exc)) from exc
        self._ca_cert_pem = ca_cert_pem
        self._pool_id = pool_id
        self._revoked = revoked

    def check(self, ann: NodeAnnouncement) -> str:
        """The announcing institution, or Unauthorized saying why the announcement is rejected."""
        return self.check_signed(ann, announcement_payload(ann))

    def check_signed(self, record: SignedRecord, payload: bytes) -> str:
        """The institution that signed payload as record's node, or Unauthorized saying why not.

        The one identity check of every signed record of a node (announcement or withdrawal).
        """
        if record.pool_id != self._pool_id:
            raise Unauthorized(f"announcement is for pool {record.pool_id!r}, not {self._pool_id!r}")
        if not record.certificate or not record.signature:
            raise Unauthorized("announcement is not signed")
        signer = verify_identity(
            self._ca_cert_pem, record.certificate, pool_id=self._pool_id, revoked=self._revoked()
        ).require(ROLE_NODE)
        if (signer.institution, signer.node_id) != (record.institution, record.node_id):
            raise Unauthorized(
                f"the certificate of {signer.describe()} cannot sign for node {record.node_id!r} "
                f"of {record.institution!r}"
            )
        verify_signature(record.certificate, payload, record.signature)
        return signer.institution

    def __call__(self, ann: NodeAnnouncement) -> bool:
        try:
            self.check(ann)
        except Unauthorized as exc:
            logger.debug("rejecting announcement of node %s: %s", ann.node_id, exc)
            return False
        return True


# --------------------------------------------------------------------------------------------- API keys


def announcement_validator(membership: Membership) -> Callable[[NodeAnnouncement], bool] | None:
    """Readers in a pool keep only records signed by a member of this pool; development mode keeps all."""
    if membership.bundle is None:
        return None
    return AnnouncementVerifier(membership.bundle.ca_cert_pem, membership.pool_id, revoked=membership.revocations)
