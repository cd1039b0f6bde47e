"""The pool's certificates: who issues what, and the names they carry.

Keys are ECDSA P-256 with SHA-256: gRPC's BoringSSL accepts them for TLS and they sign fast. Three
levels, each naming its pool, role and institution (and node) in a SAN URI
``coop://<pool_id>/<role>/<institution>[/<node_id>]``, percent-encoded:

    pool CA (path length 1)                   held by the pool admin
      member certificate (CA, path length 0)  one per institution, constrained to its DNS subtree
        node certificate (leaf)               made by each node at start, for its node id
      coordinator certificate (leaf)          one per pool coordinator, issued by the pool CA

A member certificate also carries the pool's allowance for that member: how many nodes it may
announce per model (`MAX_NODES_OID`, read with `max_nodes_of`). Node ids are the member's to mint;
the allowance is the pool's decision, signed by the pool CA with the rest of the certificate.

Checking a chain and naming a TLS peer is `coop.pool.identity`'s job.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from urllib.parse import quote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coop.errors import InvalidInput, Unauthorized

ROLE_MEMBER = "member"  # an institution: a CA for its own nodes
ROLE_NODE = "node"
ROLE_COORDINATOR = "coordinator"  # a pool coordinator: opens sessions, countersigns receipts
ROLES = (ROLE_MEMBER, ROLE_NODE, ROLE_COORDINATOR)

MEMBER_VALIDITY = dt.timedelta(days=365)
CA_VALIDITY = dt.timedelta(days=3650)
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this long before 'now' so a member whose clock lags a little can use them at once."""
SIGNATURE_HASH = hashes.SHA256()

MAX_NODES_OID = x509.ObjectIdentifier("1.3.6.1.4.1.59999.1.1")
"""Extension of a member certificate: the most nodes the member may announce per model (a DER INTEGER)."""
DEFAULT_MAX_NODES = 8
"""A member's allowance when the admin names none, and for member certificates issued without one."""
MAX_MAX_NODES = 4096


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


def san_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def role_uri(pool_id: str, role: str, institution: str, node_id: str | None = None) -> str:
    """The SAN URI that names a certificate's pool, role, institution (and node)."""
    uri = f"coop://{pool_id}/{role}/{quote(institution, safe='')}"
    return uri if node_id is None else f"{uri}/{quote(node_id, safe='')}"


def member_uri(pool_id: str, institution: str) -> str:
    return role_uri(pool_id, ROLE_MEMBER, institution)


def pool_of_ca(cert: x509.Certificate) -> str | None:
    for uri in san_uris(cert):
        rest = uri.removeprefix("coop://")
        if rest != uri and rest.endswith("/ca"):
            return rest.removesuffix("/ca")
    return None


def _label(text: str) -> str:
    """A DNS label for free text (institution names and node ids are not DNS-safe)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def member_domain(pool_id: str, institution: str) -> str:
    """The DNS subtree a member may name its nodes in: its certificate's name constraint."""
    return f"m{_label(institution)}.p{_label(pool_id)}.coop"


def node_tls_name(pool_id: str, institution: str, node_id: str) -> str:
    """The one DNS name a node's certificate carries. A client dialing an announced node verifies the
    server against exactly this name, so only that node (never another member's) can answer."""
    return f"n{_label(node_id)}.{member_domain(pool_id, institution)}"


def coordinator_tls_name(pool_id: str, institution: str) -> str:
    return f"c{_label(institution)}.p{_label(pool_id)}.coop"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ca_certificate(key: ec.EllipticCurvePrivateKey, pool_id: str, name: str) -> x509.Certificate:
    """Self-signed; path length 1: it issues member certificates, which issue node certificates."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"coop pool CA {pool_id}"),
        ]
    )
    now = utc_now()
    return (
        _builder(subject, subject, key.public_key(), now - CLOCK_SKEW, now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_signing_key_usage(issues_certificates=True), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"coop://{pool_id}/ca")]), False)
        .sign(key, SIGNATURE_HASH)
    )


def institution_name(institution: str) -> x509.Name:
    """The subject of an institution's member certificate: the issuer name of its nodes' certificates."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, institution),
            x509.NameAttribute(NameOID.COMMON_NAME, institution),
        ]
    )


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
    return bytes([0x02, len(body)]) + body


def max_nodes_of(member_cert: x509.Certificate) -> int:
    """How many nodes per model the pool allows the member of this certificate (which must be checked already)."""
    try:
        extension = member_cert.extensions.get_extension_for_oid(MAX_NODES_OID).value
    except x509.ExtensionNotFound:
        return DEFAULT_MAX_NODES
    der = extension.value if isinstance(extension, x509.UnrecognizedExtension) else b""
    if len(der) < 3 or der[0] != 0x02 or der[1] != len(der) - 2 or der[1] > 4:
        raise Unauthorized("member certificate carries a malformed node allowance")
    return min(max(int.from_bytes(der[2:], "big", signed=True), 0), MAX_MAX_NODES)


def member_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    pool_id: str,
    institution: str,
    max_nodes: int = DEFAULT_MAX_NODES,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """An institution's certificate: a CA for its own nodes only, allowed max_nodes nodes per model.

    It may issue leaf certificates (path length 0) whose DNS names lie in the institution's own
    subtree (a critical name constraint TLS libraries enforce), so a member can mint certificates
    for its nodes but never one that answers for another member's node.
    """
    if not 1 <= max_nodes <= MAX_MAX_NODES:
        raise InvalidInput(f"a member's node allowance must be 1..{MAX_MAX_NODES}, got {max_nodes}")
    key = new_key()
    now = utc_now()
    cert = (
        _builder(
            institution_name(institution), ca_cert.subject, key.public_key(), now - CLOCK_SKEW, now + MEMBER_VALIDITY
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_signing_key_usage(issues_certificates=True), critical=True)
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(member_domain(pool_id, institution))], excluded_subtrees=None
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(member_uri(pool_id, institution))]), False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ec_public_key(ca_cert)), critical=False)
        .add_extension(x509.UnrecognizedExtension(MAX_NODES_OID, _der_integer(max_nodes)), critical=False)
        .sign(ca_key, SIGNATURE_HASH)
    )
    return key, cert


def node_certificate(
    member_key: ec.EllipticCurvePrivateKey, member_cert: x509.Certificate, pool_id: str, institution: str, node_id: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A node's own TLS and signing certificate, issued by its institution's member certificate.

    A node makes a fresh one at every start; it is valid as long as the member certificate is.
    """
    key = new_key()
    now = utc_now()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, institution),
            x509.NameAttribute(NameOID.COMMON_NAME, node_id[:64]),
        ]
    )
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(node_tls_name(pool_id, institution, node_id)),
            x509.UniformResourceIdentifier(role_uri(pool_id, ROLE_NODE, institution, node_id)),
        ]
    )
    return key, _leaf(name, member_cert, member_key, key, san, now - CLOCK_SKEW, member_cert.not_valid_after_utc)


def coordinator_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, pool_id: str, institution: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A pool coordinator's certificate, issued by the pool CA itself: only it may open sessions on
    nodes and countersign receipts."""
    key = new_key()
    now = utc_now()
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(coordinator_tls_name(pool_id, institution)),
            x509.UniformResourceIdentifier(role_uri(pool_id, ROLE_COORDINATOR, institution)),
        ]
    )
    return key, _leaf(institution_name(institution), ca_cert, ca_key, key, san, now - CLOCK_SKEW, now + MEMBER_VALIDITY)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def _leaf(
    subject: x509.Name,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    san: x509.SubjectAlternativeName,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    return (
        _builder(subject, issuer_cert.subject, key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_signing_key_usage(issues_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(san, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ec_public_key(issuer_cert)), critical=False)
        .sign(issuer_key, SIGNATURE_HASH)
    )


def verify_signature(cert_pem: bytes, payload: bytes, signature: bytes) -> None:
    """Check an ECDSA/SHA-256 signature by cert's key. Does not check the certificate itself."""
    key = ec_public_key(load_cert(cert_pem, "signer certificate"))
    try:
        key.verify(signature, payload, ec.ECDSA(SIGNATURE_HASH))
    except (InvalidSignature, ValueError) as exc:
        raise Unauthorized("signature does not match") from exc
