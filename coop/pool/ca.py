"""The pool CA and member certificates: keys, issuing, verifying, and who a TLS peer is.

Keys are ECDSA P-256 with SHA-256: gRPC's BoringSSL accepts them for TLS and they sign fast. A member
certificate names its pool and institution in a SAN URI ``coop://<pool_id>/member/<institution>``
(institution percent-encoded), so a certificate from another pool's CA or for another pool id never
passes, and the institution cannot be confused with free-form subject text.

gRPC checks only the chain during the TLS handshake; revocation is not its job, so servers must
still check ``peer_institution(...)`` against the revocation list.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
from collections.abc import Collection, Mapping, Sequence
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coop.errors import Unauthorized

MEMBER_VALIDITY = dt.timedelta(days=365)
CA_VALIDITY = dt.timedelta(days=3650)
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this long before 'now' so a member whose clock lags a little can use them at once."""
SIGNATURE_HASH = hashes.SHA256()


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _signing_key_usage(*, issues_certificates: bool) -> x509.KeyUsage:
    """Every Coop key signs; only the CA's also signs certificates and revocation lists."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=issues_certificates,
        crl_sign=issues_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except (ValueError, TypeError) as exc:
        raise Unauthorized(f"{what} is not a PEM X.509 certificate") from exc


def ec_public_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise Unauthorized("certificate does not carry an ECDSA key")
    return key


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def member_uri(pool_id: str, institution: str) -> str:
    """The SAN URI that names a member certificate's pool and institution."""
    return f"coop://{pool_id}/member/{quote(institution, safe='')}"


def _member_of(cert: x509.Certificate) -> tuple[str, str]:
    """(pool_id, institution) from a member certificate's SAN URI; Unauthorized if it has none."""
    for uri in _uris(cert):
        rest = uri.removeprefix("coop://")
        pool_id, sep, encoded = rest.partition("/member/")
        if rest != uri and sep and pool_id and encoded and "/" not in encoded:
            try:
                return pool_id, unquote(encoded, errors="strict")
            except UnicodeDecodeError as exc:
                raise Unauthorized("certificate names an institution that is not UTF-8") from exc
    raise Unauthorized("certificate is not a coop member certificate (no coop://<pool>/member/<name> SAN)")


def pool_of_ca(cert: x509.Certificate) -> str | None:
    for uri in _uris(cert):
        rest = uri.removeprefix("coop://")
        if rest != uri and rest.endswith("/ca"):
            return rest.removesuffix("/ca")
    return None


def pool_tls_name(pool_id: str) -> str:
    """A DNS name every member certificate of the pool carries.

    Nodes run on hosts whose names are unknown when the certificate is issued, so a client reaching a
    node at any address verifies the server against this name (``MemberBundle.channel_options``); the
    chain to the pool CA is what proves membership, and ``peer_institution`` tells who it is.
    """
    return f"{pool_id}.pool.coop"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ca_certificate(key: ec.EllipticCurvePrivateKey, pool_id: str, name: str) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"coop pool CA {pool_id}"),
        ]
    )
    now = utc_now()
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _signing_key_usage(issues_certificates=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"coop://{pool_id}/ca")]), False)
        .sign(key, SIGNATURE_HASH)
    )


def member_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, pool_id: str, institution: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    public = key.public_key()
    now = utc_now()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, institution),
            x509.NameAttribute(NameOID.COMMON_NAME, institution),
        ]
    )
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.DNSName(pool_tls_name(pool_id)),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
            x509.UniformResourceIdentifier(member_uri(pool_id, institution)),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + MEMBER_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _signing_key_usage(issues_certificates=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ec_public_key(ca_cert)),
            critical=False,
        )
        .sign(ca_key, SIGNATURE_HASH)
    )
    return key, cert


def verify_member_certificate(
    ca_cert_pem: bytes,
    cert_pem: bytes,
    *,
    pool_id: str,
    revoked: Collection[str] = (),
    now: dt.datetime | None = None,
) -> str:
    """The institution a member certificate vouches for; Unauthorized unless it is valid in this pool.

    Valid means: signed by this CA, within its validity period (and the CA's), a member (not CA)
    certificate, naming pool_id, and its institution not in revoked.
    """
    ca = load_cert(ca_cert_pem, "pool CA certificate")
    cert = load_cert(cert_pem, "member certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise Unauthorized("certificate was not issued by this pool's CA") from exc
    when = now or utc_now()
    for what, c in (("certificate", cert), ("pool CA certificate", ca)):
        if when < c.not_valid_before_utc:
            raise Unauthorized(f"{what} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if when > c.not_valid_after_utc:
            raise Unauthorized(f"{what} expired on {c.not_valid_after_utc:%Y-%m-%d} UTC")
    with contextlib.suppress(x509.ExtensionNotFound):
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise Unauthorized("a CA certificate cannot act as a member")
    cert_pool, institution = _member_of(cert)
    ca_pool = pool_of_ca(ca)
    if cert_pool != pool_id or (ca_pool is not None and ca_pool != pool_id):
        raise Unauthorized(f"certificate belongs to pool {cert_pool!r}, not {pool_id!r}")
    if institution in revoked:
        raise Unauthorized(f"membership of {institution!r} in pool {pool_id} has been revoked")
    return institution


def certificate_institution(cert_pem: bytes) -> str:
    """The institution a member certificate names (not checked: see verify_member_certificate)."""
    return _member_of(load_cert(cert_pem, "member certificate"))[1]


def verify_signature(cert_pem: bytes, payload: bytes, signature: bytes) -> None:
    """Check an ECDSA/SHA-256 signature by cert's key. Does not check the certificate itself."""
    key = ec_public_key(load_cert(cert_pem, "signer certificate"))
    try:
        key.verify(signature, payload, ec.ECDSA(SIGNATURE_HASH))
    except (InvalidSignature, ValueError) as exc:
        raise Unauthorized("signature does not match") from exc


def peer_institution(auth_context: Mapping[str, Sequence[bytes]], *, pool_id: str | None = None) -> str | None:
    """The institution of the TLS peer of a gRPC call (``context.auth_context()``), or None.

    The server's mutual-TLS handshake already proved the certificate chains to the pool CA; this
    reads who it is from the SAN URI of ``x509_pem_cert``. It does not consult revocations.
    """
    pems = auth_context.get("x509_pem_cert") or ()
    if not pems:
        return None
    try:
        cert_pool, institution = _member_of(x509.load_pem_x509_certificate(pems[0]))
    except (ValueError, TypeError, Unauthorized):
        return None
    if pool_id is not None and cert_pool != pool_id:
        return None
    return institution


# ----------------------------------------------------------------------------------------- revocations
