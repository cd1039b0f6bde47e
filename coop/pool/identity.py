"""Who a certificate chain or a TLS peer is: its pool, role, institution and node.

`verify_identity` checks a chain carried in a signed record (an announcement, a receipt, a
route) against the pool CA, revocations and the clock. `peer_identity` names the peer of a gRPC
call, whose chain TLS has already verified (name constraints included), from its leaf alone.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from coop.errors import Unauthorized
from coop.pool.ca import (
    ROLE_COORDINATOR,
    ROLE_MEMBER,
    ROLE_NODE,
    ROLES,
    institution_name,
    load_cert,
    node_tls_name,
    pool_of_ca,
    san_uris,
    utc_now,
)

MAX_CHAIN_BYTES = 32768


@dataclass(frozen=True)
class Identity:
    pool_id: str
    role: str
    institution: str
    node_id: str | None = None
    certificate: bytes = field(default=b"", repr=False, compare=False)  # the leaf, PEM

    def require(self, role: str) -> Identity:
        if self.role != role:
            raise Unauthorized(f"{self.describe()} is not a {role} of this pool")
        return self

    def describe(self) -> str:
        if self.node_id is not None:
            return f"node {self.node_id!r} of {self.institution!r}"
        return f"{self.role} {self.institution!r}"


def identity_of(cert: x509.Certificate) -> Identity:
    """What a certificate's SAN URI claims (nothing checked); Unauthorized if it names no coop role."""
    for uri in san_uris(cert):
        rest = uri.removeprefix("coop://")
        parts = rest.split("/")
        if rest == uri or len(parts) not in (3, 4) or parts[1] not in ROLES or not parts[0]:
            continue
        pool_id, role, *names = parts
        if (role == ROLE_NODE) != (len(names) == 2) or not all(names):
            continue
        try:
            institution, *node = (unquote(name, errors="strict") for name in names)
        except UnicodeDecodeError as exc:
            raise Unauthorized("certificate names an institution that is not UTF-8") from exc
        return Identity(pool_id, role, institution, node[0] if node else None)
    raise Unauthorized("certificate is not a coop certificate (no coop://<pool>/<role>/<name> SAN)")


def claimed_identity(chain_pem: bytes) -> Identity:
    """What a chain's leaf claims, unchecked (for display and indexing; see verify_identity)."""
    return identity_of(_certs(chain_pem)[0])


def _certs(chain_pem: bytes) -> list[x509.Certificate]:
    if len(chain_pem) > MAX_CHAIN_BYTES:
        raise Unauthorized(f"a certificate chain is at most {MAX_CHAIN_BYTES} bytes")
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except (ValueError, TypeError) as exc:
        raise Unauthorized("certificate chain is not PEM X.509") from exc
    if not 1 <= len(certs) <= 2:
        raise Unauthorized("a certificate chain has one or two certificates")
    return certs


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise Unauthorized(f"{what} was not issued by {issuer.subject.rfc4514_string()[:80]}") from exc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_identity(
    ca_cert_pem: bytes,
    chain_pem: bytes,
    *,
    pool_id: str,
    revoked: Collection[str] = (),
    now: dt.datetime | None = None,
) -> Identity:
    """Who a chain (leaf first) vouches for; Unauthorized unless every link is valid in this pool now.

    Member and coordinator certificates are issued by the pool CA; a node certificate by its own
    institution's member certificate, which must follow it in the chain, and it carries exactly the
    DNS name of its node. Every certificate must be within its validity period (the CA's too), and
    the institution not revoked.
    """
    ca = load_cert(ca_cert_pem, "pool CA certificate")
    certs = _certs(chain_pem)
    leaf = certs[0]
    identity = identity_of(leaf)
    ca_pool = pool_of_ca(ca)
    if identity.pool_id != pool_id or (ca_pool is not None and ca_pool != pool_id):
        raise Unauthorized(f"certificate belongs to pool {identity.pool_id!r}, not {pool_id!r}")
    if identity.role == ROLE_NODE:
        if len(certs) != 2:
            raise Unauthorized("a node certificate must come with its institution's member certificate")
        member = certs[1]
        issuer = identity_of(member)
        if (issuer.pool_id, issuer.role, issuer.institution) != (pool_id, ROLE_MEMBER, identity.institution):
            raise Unauthorized(f"node certificate of {identity.institution!r} is not issued by that member")
        _issued_by(member, ca, "certificate")
        _issued_by(leaf, member, "node certificate")
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert identity.node_id is not None
        if names.get_values_for_type(x509.DNSName) != [node_tls_name(pool_id, identity.institution, identity.node_id)]:
            raise Unauthorized("node certificate does not carry exactly its node's name")
    else:
        if len(certs) != 1:
            raise Unauthorized(f"a {identity.role} certificate comes alone, without a chain")
        _issued_by(leaf, ca, "certificate")
        if _is_ca(leaf) != (identity.role == ROLE_MEMBER):
            raise Unauthorized(f"certificate is not a valid {identity.role} certificate")
    when = now or utc_now()
    links = [("certificate", leaf), *(("member certificate", m) for m in certs[1:]), ("pool CA certificate", ca)]
    for what, c in links:
        if when < c.not_valid_before_utc:
            raise Unauthorized(f"{what} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if when > c.not_valid_after_utc:
            raise Unauthorized(f"{what} expired on {c.not_valid_after_utc:%Y-%m-%d} UTC")
    if identity.institution in revoked:
        raise Unauthorized(f"membership of {identity.institution!r} in pool {pool_id} has been revoked")
    leaf_pem = leaf.public_bytes(serialization.Encoding.PEM)
    return Identity(identity.pool_id, identity.role, identity.institution, identity.node_id, leaf_pem)


def peer_identity(auth_context: Mapping[str, Sequence[bytes]], ca_cert_pem: bytes, *, pool_id: str) -> Identity | None:
    """Who the TLS peer of a gRPC call is (``context.auth_context()``), or None if it is no one here.

    The mutual-TLS handshake already proved the peer's chain leads to the pool CA and keeps to the
    member's name constraint; gRPC hands over the leaf only. So the leaf's issuer must be the one its
    role requires: the pool CA for a coordinator (name and key id), the institution's member
    certificate for a node. Revocations are the caller's to check.
    """
    pems = auth_context.get("x509_pem_cert") or ()
    return _tls_peer(pems[0], ca_cert_pem, pool_id) if pems else None


@functools.lru_cache(maxsize=4096)
def _tls_peer(leaf_pem: bytes, ca_cert_pem: bytes, pool_id: str) -> Identity | None:
    """Cached: every call of a session's peers presents the same leaf (the result depends on nothing else)."""
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        identity = identity_of(leaf)
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except (ValueError, TypeError, Unauthorized, x509.ExtensionNotFound):
        return None
    if identity.pool_id != pool_id or _is_ca(leaf):
        return None
    ca = load_cert(ca_cert_pem, "pool CA certificate")
    if identity.role == ROLE_NODE:
        expected_issuer = institution_name(identity.institution)
    elif identity.role == ROLE_COORDINATOR:
        expected_issuer = ca.subject
        ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        if aki != ca_ski:
            return None
    else:
        return None
    if leaf.issuer != expected_issuer:
        return None
    return Identity(identity.pool_id, identity.role, identity.institution, identity.node_id, leaf_pem)
