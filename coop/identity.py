"""Pool membership: who may serve, route and spend in a pool, as vouched for by the pool CA.

The pool administrator keeps one pool directory; nothing in it is ever overwritten in place by
``create_pool`` or ``add_member``, and every secret is created with mode 0600 from the first byte::

    pool.toml               pool id, name, bootstrap peers, ledger URL, limits, sha256 of the admin token
    ca.key          0600    the pool CA's private key: whoever holds it can admit members
    ca.crt                  self-signed pool CA certificate (SAN URI coop://<pool_id>/ca)
    admin.token     0600    the admin credential (shown once by `coop pool init`)
    revocations.json        CA-signed list of revoked institutions and certificate serials
    api_keys.json   0600    sha256 of every API key with its institution; never a key itself
    members/<name>.json     public record of a member certificate (serial, validity, PEM)
    members/<name>.bundle   0600: what the admin hands the member: pool config, CA cert, member cert + key

A member uses its bundle for mutual TLS on the data plane (``server_credentials`` /
``channel_credentials``), to sign its DHT announcements (``sign_announcement``, checked by every
reader with ``AnnouncementVerifier``) and to sign anything else (``MemberBundle.sign`` /
``verify_signature``).

Keys are ECDSA P-256 with SHA-256: gRPC's BoringSSL accepts them for TLS and they sign fast. A member
certificate names its pool and institution in a SAN URI ``coop://<pool_id>/member/<institution>``
(institution percent-encoded), so a certificate from another pool's CA or for another pool id never
passes, and the institution cannot be confused with free-form subject text.

gRPC checks only the chain during the TLS handshake; revocation is this module's job, so servers must
still check ``peer_institution(...)`` against the revocation list.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coop.errors import InvalidInput, Unauthorized

if TYPE_CHECKING:  # importing the directory pulls in hivemind, which the admin CLI does not need
    from coop.node.directory import NodeAnnouncement

logger = logging.getLogger(__name__)

POOL_FILE = "pool.toml"
CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
ADMIN_TOKEN_FILE = "admin.token"
REVOCATIONS_FILE = "revocations.json"
API_KEYS_FILE = "api_keys.json"
MEMBERS_DIR = "members"
RESERVED_INSTITUTION = "pool"  # the ledger's pool account (coop.ledger.models.POOL_ACCOUNT)

BUNDLE_FORMAT = "coop-member-bundle/1"
API_KEYS_FORMAT = "coop-api-keys/1"
API_KEY_PREFIX = "coop_"
MEMBER_VALIDITY = dt.timedelta(days=365)
CA_VALIDITY = dt.timedelta(days=3650)
_CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this long before 'now' so a member whose clock lags a little can use them at once."""

# Domain-separation prefixes: a signature made for one purpose can never be replayed as another.
_ANNOUNCEMENT_DOMAIN = b"coop-announcement-v1\n"
_REVOCATIONS_DOMAIN = b"coop-revocations-v1\n"
_SIGNATURE_HASH = hashes.SHA256()


# ---------------------------------------------------------------------------------------------- helpers


def _check_name(what: str, name: object) -> str:
    """Institution and pool names end up in file names and certificate CNs (at most 64 UTF-8 bytes)."""
    if not isinstance(name, str) or not 1 <= len(name.encode("utf-8")) <= 64:
        raise InvalidInput(f"{what} must be 1 to 64 characters (UTF-8 bytes), got {str(name)[:80]!r}")
    if not name.isprintable() or name != name.strip():
        raise InvalidInput(f"{what} {name!r} must be printable text without leading or trailing spaces")
    if name.startswith(".") or "/" in name or "\\" in name:
        raise InvalidInput(f"{what} {name!r} may not start with '.' or contain '/' or '\\' (it names a file)")
    return name


def _check_text(what: str, value: str) -> str:
    if not value or not value.isprintable():
        raise InvalidInput(f"{what} must be non-empty printable text, got {value[:80]!r}")
    return value


def _create_file(path: Path, data: bytes, mode: int) -> None:
    """Create path with mode from the first byte; never overwrite (O_EXCL)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise InvalidInput(f"{path} already exists; refusing to overwrite it") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace path; the temporary file already has the final mode, so no secret leaks."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    _create_file(tmp, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise InvalidInput(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _pool_lock(pool_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of the pool directory across concurrent admin commands."""
    fd = os.open(pool_dir / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def api_key_digest(key: str) -> str:
    """What api_keys.json stores of a key, and what a key is recognised by."""
    return _sha256_hex(key)


def _toml_str(value: str) -> str:
    # A JSON string of printable text (no control chars, no DEL) is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=False)


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except (ValueError, TypeError) as exc:
        raise Unauthorized(f"{what} is not a PEM X.509 certificate") from exc


def _ec_public_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
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


def _pool_of_ca(cert: x509.Certificate) -> str | None:
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


# ------------------------------------------------------------------------------------------------- pool


@dataclass(frozen=True)
class PoolLimits:
    """Per-request guard rails every coordinator of the pool enforces."""

    max_tokens_per_request: int = 4096
    max_concurrent_requests_per_key: int = 8

    def __post_init__(self) -> None:
        for name in ("max_tokens_per_request", "max_concurrent_requests_per_key"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise InvalidInput(f"pool limit {name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return {
            "max_tokens_per_request": self.max_tokens_per_request,
            "max_concurrent_requests_per_key": self.max_concurrent_requests_per_key,
        }

    @classmethod
    def from_dict(cls, obj: object) -> PoolLimits:
        if not isinstance(obj, Mapping):
            raise InvalidInput("pool limits must be a table")
        try:
            return cls(**{key: obj[key] for key in ("max_tokens_per_request", "max_concurrent_requests_per_key")})
        except KeyError as exc:
            raise InvalidInput(f"pool limits lack {exc.args[0]}") from exc


@dataclass(frozen=True)
class PoolInfo:
    """What pool.toml says. ``admin_token`` is set only on the value create_pool returns."""

    directory: Path
    pool_id: str
    name: str
    bootstrap: tuple[str, ...]
    ledger_url: str | None
    limits: PoolLimits
    admin_token_sha256: str
    admin_token: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, directory: Path | str) -> PoolInfo:
        directory = Path(directory)
        path = directory / POOL_FILE
        raw = _read(path, "pool configuration")
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
            return cls(
                directory=directory,
                pool_id=str(doc["pool_id"]),
                name=str(doc["name"]),
                bootstrap=tuple(str(addr) for addr in doc.get("bootstrap", [])),
                ledger_url=str(doc["ledger_url"]) if "ledger_url" in doc else None,
                limits=PoolLimits.from_dict(doc.get("limits", {})),
                admin_token_sha256=str(doc["admin_token_sha256"]),
            )
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
            raise InvalidInput(f"{path} is not a valid pool configuration: {exc}") from exc

    def check_admin_token(self, token: str) -> bool:
        """Constant-time check of an admin credential against the stored hash."""
        return hmac.compare_digest(_sha256_hex(token), self.admin_token_sha256)

    def ca_cert_pem(self) -> bytes:
        return _read(self.directory / CA_CERT_FILE, "pool CA certificate")

    def to_toml(self) -> str:
        lines = [
            "# Coop pool configuration, written by `coop pool init`. Safe to share with members.",
            f"pool_id = {_toml_str(self.pool_id)}",
            f"name = {_toml_str(self.name)}",
            f"bootstrap = [{', '.join(_toml_str(addr) for addr in self.bootstrap)}]",
        ]
        if self.ledger_url is not None:
            lines.append(f"ledger_url = {_toml_str(self.ledger_url)}")
        lines += [
            f"admin_token_sha256 = {_toml_str(self.admin_token_sha256)}",
            "",
            "[limits]",
            *(f"{key} = {value}" for key, value in self.limits.to_dict().items()),
        ]
        return "\n".join(lines) + "\n"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey, pool_id: str, name: str) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"coop pool CA {pool_id}"),
        ]
    )
    now = _now()
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"coop://{pool_id}/ca")]), False)
        .sign(key, _SIGNATURE_HASH)
    )


def create_pool(
    directory: Path | str,
    name: str,
    *,
    bootstrap: Sequence[str] = (),
    ledger_url: str | None = None,
    limits: PoolLimits | None = None,
) -> PoolInfo:
    """Create a new pool in directory (made if missing): CA, admin token, empty registries.

    Refuses, changing nothing, if directory already holds any pool file. The returned PoolInfo carries
    the admin token in clear; it is the only time the token is available apart from admin.token.
    """
    directory = Path(directory)
    _check_name("pool name", name)
    addrs = tuple(_check_text("bootstrap address", addr) for addr in bootstrap)
    if ledger_url is not None:
        _check_text("ledger URL", ledger_url)
    if directory.exists() and not directory.is_dir():
        raise InvalidInput(f"{directory} exists and is not a directory")
    names = (POOL_FILE, CA_KEY_FILE, CA_CERT_FILE, ADMIN_TOKEN_FILE, REVOCATIONS_FILE, API_KEYS_FILE, MEMBERS_DIR)
    existing = [n for n in names if (directory / n).exists()]
    if existing:
        raise InvalidInput(
            f"{directory} already holds a pool ({', '.join(existing)}); nothing was changed. "
            "Use another directory, or manage this pool with `coop member ...`"
        )

    pool_id = secrets.token_hex(8)  # url-safe and within the [A-Za-z0-9._:-] alphabet of DHT ids
    ca_key = _new_key()
    ca_cert = _ca_certificate(ca_key, pool_id, name)
    token = "coop_admin_" + secrets.token_urlsafe(32)
    info = PoolInfo(
        directory=directory,
        pool_id=pool_id,
        name=name,
        bootstrap=addrs,
        ledger_url=ledger_url,
        limits=limits or PoolLimits(),
        admin_token_sha256=_sha256_hex(token),
        admin_token=token,
    )
    revocations = RevocationList(pool_id=pool_id, issued_at=time.time()).signed(ca_key)

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _create_file(directory / CA_KEY_FILE, _key_pem(ca_key), 0o600)
    _create_file(directory / CA_CERT_FILE, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _create_file(directory / ADMIN_TOKEN_FILE, (token + "\n").encode(), 0o600)
    _create_file(directory / REVOCATIONS_FILE, revocations.to_bytes(), 0o644)
    _create_file(directory / API_KEYS_FILE, _api_keys_json([]), 0o600)
    (directory / MEMBERS_DIR).mkdir(mode=0o700)
    _create_file(directory / POOL_FILE, info.to_toml().encode("utf-8"), 0o644)  # last: marks a complete pool
    return info


def _load_ca(pool: PoolInfo) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    raw = _read(pool.directory / CA_KEY_FILE, "pool CA key")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{pool.directory / CA_KEY_FILE} is not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInput(f"{pool.directory / CA_KEY_FILE} is not an ECDSA key")
    return key, _load_cert(pool.ca_cert_pem(), "pool CA certificate")


# ---------------------------------------------------------------------------------------------- members


@dataclass(frozen=True)
class MemberInfo:
    """The admin's public record of one member certificate (members/<institution>.json)."""

    institution: str
    serial: str  # lower-case hex
    not_before: dt.datetime
    not_after: dt.datetime
    revoked: bool
    cert_pem: bytes = field(repr=False)


def _member_paths(pool_dir: Path, institution: str) -> tuple[Path, Path]:
    members = pool_dir / MEMBERS_DIR
    return members / f"{institution}.json", members / f"{institution}.bundle"


def _member_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, pool_id: str, institution: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    public = key.public_key()
    now = _now()
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
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + MEMBER_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(_ec_public_key(ca_cert)),
            critical=False,
        )
        .sign(ca_key, _SIGNATURE_HASH)
    )
    return key, cert


def add_member(pool_dir: Path | str, institution: str) -> Path:
    """Admit institution: issue it a CA-signed key + certificate and write its bundle; returns the bundle path.

    The bundle holds the member's private key: hand it over out of band and delete the admin's copy if
    policy demands. Refuses a name already used, even by a revoked member.
    """
    pool = PoolInfo.load(pool_dir)
    _check_name("institution", institution)
    if institution.lower() == RESERVED_INSTITUTION:
        raise InvalidInput(f"{institution!r} is reserved for the pool's own ledger account; pick another name")
    record_path, bundle_path = _member_paths(pool.directory, institution)
    with _pool_lock(pool.directory):
        if record_path.exists() or bundle_path.exists():
            raise InvalidInput(f"member {institution!r} already exists in pool {pool.name!r}; pick another name")
        ca_key, ca_cert = _load_ca(pool)
        key, cert = _member_certificate(ca_key, ca_cert, pool.pool_id, institution)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        bundle = MemberBundle(
            pool_id=pool.pool_id,
            pool_name=pool.name,
            institution=institution,
            ca_cert_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
            cert_pem=cert_pem,
            key_pem=_key_pem(key),
            bootstrap=pool.bootstrap,
            ledger_url=pool.ledger_url,
            limits=pool.limits,
        )
        _create_file(bundle_path, bundle.to_bytes(), 0o600)
        record = {
            "institution": institution,
            "serial": format(cert.serial_number, "x"),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "cert_pem": cert_pem.decode("ascii"),
        }
        _create_file(record_path, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode(), 0o644)
    return bundle_path


def _read_member(path: Path, revoked: Collection[str]) -> MemberInfo:
    try:
        doc = json.loads(_read(path, "member record"))
        return MemberInfo(
            institution=str(doc["institution"]),
            serial=str(doc["serial"]),
            not_before=dt.datetime.fromisoformat(doc["not_before"]),
            not_after=dt.datetime.fromisoformat(doc["not_after"]),
            revoked=str(doc["institution"]) in revoked,
            cert_pem=str(doc["cert_pem"]).encode("ascii"),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{path} is not a valid member record: {exc}") from exc


def list_members(pool_dir: Path | str) -> list[MemberInfo]:
    """Every member ever admitted (revoked ones flagged), sorted by institution."""
    pool = PoolInfo.load(pool_dir)
    revoked = set(read_revocations(pool).revoked)
    paths = sorted((pool.directory / MEMBERS_DIR).glob("*.json"))
    return sorted((_read_member(path, revoked) for path in paths), key=lambda m: m.institution)


def revoke_member(pool_dir: Path | str, institution: str) -> RevocationList:
    """Revoke institution's certificate and all its API keys; re-signs revocations.json. Idempotent.

    Distribute the new revocations.json to coordinators and nodes: TLS alone does not consult it.
    """
    pool = PoolInfo.load(pool_dir)
    record_path, _ = _member_paths(pool.directory, _check_name("institution", institution))
    with _pool_lock(pool.directory):
        if not record_path.exists():
            raise InvalidInput(f"no member {institution!r} in pool {pool.name!r}; see `coop member list`")
        member = _read_member(record_path, ())
        ca_key, _ = _load_ca(pool)
        current = read_revocations(pool)
        updated = RevocationList(
            pool_id=pool.pool_id,
            revoked=tuple(sorted({*current.revoked, institution})),
            serials=tuple(sorted({*current.serials, member.serial})),
            issued_at=time.time(),
        ).signed(ca_key)
        _replace_file(pool.directory / REVOCATIONS_FILE, updated.to_bytes(), 0o644)
        _revoke_keys_locked(pool.directory, institution)
    return updated


# ----------------------------------------------------------------------------------------- member bundle


@dataclass(frozen=True)
class MemberBundle:
    """A member institution's credentials: its certificate and key, and the pool's CA and config."""

    pool_id: str
    pool_name: str
    institution: str
    ca_cert_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    bootstrap: tuple[str, ...] = ()
    ledger_url: str | None = None
    limits: PoolLimits = field(default_factory=PoolLimits)

    @classmethod
    def load(cls, path: Path | str) -> MemberBundle:
        """Read and check a bundle: well-formed, key matches certificate, certificate valid for its pool."""
        path = Path(path)
        raw = _read(path, "member bundle")
        try:
            doc = json.loads(raw)
            if doc.get("format") != BUNDLE_FORMAT:
                raise ValueError(f"format is {str(doc.get('format'))[:40]!r}, expected {BUNDLE_FORMAT!r}")
            pool = doc["pool"]
            bundle = cls(
                pool_id=str(pool["pool_id"]),
                pool_name=str(pool["name"]),
                institution=str(doc["institution"]),
                ca_cert_pem=str(doc["ca_cert_pem"]).encode("ascii"),
                cert_pem=str(doc["cert_pem"]).encode("ascii"),
                key_pem=str(doc["key_pem"]).encode("ascii"),
                bootstrap=tuple(str(addr) for addr in pool.get("bootstrap", [])),
                ledger_url=None if pool.get("ledger_url") is None else str(pool["ledger_url"]),
                limits=PoolLimits.from_dict(pool.get("limits", {})),
            )
            key = bundle._private_key
        except (ValueError, KeyError, TypeError, AttributeError, InvalidInput, UnsupportedAlgorithm) as exc:
            raise InvalidInput(f"{path} is not a valid coop member bundle: {exc}") from exc
        try:
            institution = verify_member_certificate(bundle.ca_cert_pem, bundle.cert_pem, pool_id=bundle.pool_id)
        except Unauthorized as exc:
            raise Unauthorized(f"member bundle {path}: {exc}; ask the pool admin for a new one") from exc
        if institution != bundle.institution:
            raise InvalidInput(f"{path}: certificate is for {institution!r}, bundle says {bundle.institution!r}")
        cert_key = _ec_public_key(_load_cert(bundle.cert_pem, "member certificate"))
        if key.public_key().public_numbers() != cert_key.public_numbers():
            raise InvalidInput(f"{path}: the private key does not match the certificate")
        return bundle

    def to_bytes(self) -> bytes:
        doc = {
            "format": BUNDLE_FORMAT,
            "pool": {
                "pool_id": self.pool_id,
                "name": self.pool_name,
                "bootstrap": list(self.bootstrap),
                "ledger_url": self.ledger_url,
                "limits": self.limits.to_dict(),
            },
            "institution": self.institution,
            "ca_cert_pem": self.ca_cert_pem.decode("ascii"),
            "cert_pem": self.cert_pem.decode("ascii"),
            "key_pem": self.key_pem.decode("ascii"),
        }
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    @cached_property
    def _private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("member key is not an ECDSA key")
        return key

    def sign(self, payload: bytes) -> bytes:
        """DER-encoded ECDSA/SHA-256 signature; check with verify_signature(self.cert_pem, ...)."""
        return self._private_key.sign(payload, ec.ECDSA(_SIGNATURE_HASH))

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: clients must present a certificate chaining to the pool CA."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)], root_certificates=self.ca_cert_pem, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Trust only the pool CA, and present this member's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """Channel options that make any node of this pool verifiable at any address (see pool_tls_name)."""
        return [("grpc.ssl_target_name_override", pool_tls_name(self.pool_id))]


# ------------------------------------------------------------------------------------------ verification


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
    ca = _load_cert(ca_cert_pem, "pool CA certificate")
    cert = _load_cert(cert_pem, "member certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise Unauthorized("certificate was not issued by this pool's CA") from exc
    when = now or _now()
    for what, c in (("certificate", cert), ("pool CA certificate", ca)):
        if when < c.not_valid_before_utc:
            raise Unauthorized(f"{what} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if when > c.not_valid_after_utc:
            raise Unauthorized(f"{what} expired on {c.not_valid_after_utc:%Y-%m-%d} UTC")
    with contextlib.suppress(x509.ExtensionNotFound):
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise Unauthorized("a CA certificate cannot act as a member")
    cert_pool, institution = _member_of(cert)
    ca_pool = _pool_of_ca(ca)
    if cert_pool != pool_id or (ca_pool is not None and ca_pool != pool_id):
        raise Unauthorized(f"certificate belongs to pool {cert_pool!r}, not {pool_id!r}")
    if institution in revoked:
        raise Unauthorized(f"membership of {institution!r} in pool {pool_id} has been revoked")
    return institution


def certificate_institution(cert_pem: bytes) -> str:
    """The institution a member certificate names (not checked: see verify_member_certificate)."""
    return _member_of(_load_cert(cert_pem, "member certificate"))[1]


def verify_signature(cert_pem: bytes, payload: bytes, signature: bytes) -> None:
    """Check an ECDSA/SHA-256 signature by cert's key. Does not check the certificate itself."""
    key = _ec_public_key(_load_cert(cert_pem, "signer certificate"))
    try:
        key.verify(signature, payload, ec.ECDSA(_SIGNATURE_HASH))
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


@dataclass(frozen=True)
class RevocationList:
    """The CA-signed list of revoked institutions (and their certificate serials, in hex) of one pool."""

    pool_id: str
    revoked: tuple[str, ...] = ()
    serials: tuple[str, ...] = ()
    issued_at: float = 0.0
    signature: bytes = field(default=b"", repr=False)

    def payload(self) -> bytes:
        """The canonical bytes the CA signs: everything but the signature."""
        doc = {
            "pool_id": self.pool_id,
            "revoked": list(self.revoked),
            "serials": list(self.serials),
            "issued_at": self.issued_at,
        }
        return _REVOCATIONS_DOMAIN + json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def signed(self, ca_key: ec.EllipticCurvePrivateKey) -> RevocationList:
        signature = ca_key.sign(self.payload(), ec.ECDSA(_SIGNATURE_HASH))
        return RevocationList(self.pool_id, self.revoked, self.serials, self.issued_at, signature)

    def to_bytes(self) -> bytes:
        doc = {
            "pool_id": self.pool_id,
            "revoked": list(self.revoked),
            "serials": list(self.serials),
            "issued_at": self.issued_at,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        try:
            doc = json.loads(data)
            revoked, serials = doc["revoked"], doc["serials"]
            if not all(isinstance(x, str) for x in [*revoked, *serials]):
                raise TypeError("revoked and serials must be lists of strings")
            issued_at = doc["issued_at"]
            if isinstance(issued_at, bool) or not isinstance(issued_at, int | float):
                raise TypeError("issued_at must be a number")
            return cls(
                pool_id=str(doc["pool_id"]),
                revoked=tuple(revoked),
                serials=tuple(serials),
                issued_at=float(issued_at),
                signature=base64.b64decode(doc["signature"], validate=True),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"malformed revocation list: {exc}") from exc

    def verify(self, ca_cert_pem: bytes) -> None:
        """Unauthorized unless this list is signed by the given pool CA and is for that CA's pool."""
        ca = _load_cert(ca_cert_pem, "pool CA certificate")
        ca_pool = _pool_of_ca(ca)
        if ca_pool != self.pool_id:
            raise Unauthorized(f"revocation list is for pool {self.pool_id!r}, the CA is of pool {ca_pool!r}")
        try:
            verify_signature(ca_cert_pem, self.payload(), self.signature)
        except Unauthorized as exc:
            raise Unauthorized("revocation list is not signed by the pool CA") from exc

    @classmethod
    def load(cls, path: Path | str, ca_cert_pem: bytes) -> RevocationList:
        """Read and verify a revocations.json (e.g. a copy the admin distributed)."""
        revocations = cls.from_bytes(_read(Path(path), "revocation list"))
        revocations.verify(ca_cert_pem)
        return revocations


def read_revocations(pool: PoolInfo) -> RevocationList:
    """The pool directory's own revocations.json, verified against its CA."""
    return RevocationList.load(pool.directory / REVOCATIONS_FILE, pool.ca_cert_pem())


# --------------------------------------------------------------------------------------- announcements


def announcement_payload(ann: NodeAnnouncement) -> bytes:
    """Canonical bytes of every field but the signature (certificate included, so it is bound too).

    JSON with sorted keys; bytes as base64; float fields always as floats, so an int that a peer's
    msgpack round trip keeps as an int cannot change the encoding.
    """
    doc: dict[str, Any] = {}
    for name, info in type(ann).model_fields.items():
        if name == "signature":
            continue
        value = getattr(ann, name)
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        elif info.annotation is float:
            value = float(value)
        doc[name] = value
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return _ANNOUNCEMENT_DOMAIN + body.encode("utf-8")


def sign_announcement(bundle: MemberBundle, ann: NodeAnnouncement) -> NodeAnnouncement:
    """A copy of ann carrying bundle's certificate and a signature over everything else.

    Use as ``Announcer(..., finalize=lambda ann: sign_announcement(bundle, ann))``.
    """
    if ann.pool_id != bundle.pool_id or ann.institution != bundle.institution:
        raise InvalidInput(
            f"cannot sign an announcement of {ann.institution!r} in pool {ann.pool_id!r} "
            f"with the credentials of {bundle.institution!r} in pool {bundle.pool_id!r}"
        )
    unsigned = type(ann).model_validate({**ann.to_wire(), "certificate": bundle.cert_pem, "signature": b""})
    return type(ann).model_validate({**unsigned.to_wire(), "signature": bundle.sign(announcement_payload(unsigned))})


class AnnouncementVerifier:
    """``list_nodes(validator=AnnouncementVerifier(...))``: keep only announcements the pool CA vouches for.

    An announcement passes if its certificate is a valid, unrevoked member certificate of this pool,
    names the same institution as the announcement, and signed exactly these field values.
    """

    def __init__(self, ca_cert_pem: bytes, pool_id: str, revoked: Callable[[], Collection[str]] = lambda: ()) -> None:
        try:
            _load_cert(ca_cert_pem, "pool CA certificate")
        except Unauthorized as exc:
            raise InvalidInput(str(exc)) from exc
        self._ca_cert_pem = ca_cert_pem
        self._pool_id = pool_id
        self._revoked = revoked

    def check(self, ann: NodeAnnouncement) -> str:
        """The announcing institution, or Unauthorized saying why the announcement is rejected."""
        if ann.pool_id != self._pool_id:
            raise Unauthorized(f"announcement is for pool {ann.pool_id!r}, not {self._pool_id!r}")
        if not ann.certificate or not ann.signature:
            raise Unauthorized("announcement is not signed")
        institution = verify_member_certificate(
            self._ca_cert_pem, ann.certificate, pool_id=self._pool_id, revoked=self._revoked()
        )
        if institution != ann.institution:
            raise Unauthorized(f"certificate of {institution!r} cannot announce for {ann.institution!r}")
        verify_signature(ann.certificate, announcement_payload(ann), ann.signature)
        return institution

    def __call__(self, ann: NodeAnnouncement) -> bool:
        try:
            self.check(ann)
        except Unauthorized as exc:
            logger.debug("rejecting announcement of node %s: %s", ann.node_id, exc)
            return False
        return True


# --------------------------------------------------------------------------------------------- API keys


@dataclass(frozen=True)
class ApiKeyRecord:
    sha256: str
    institution: str
    created_at: float
    revoked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "institution": self.institution,
            "created_at": self.created_at,
            "revoked": self.revoked,
        }


def _api_keys_json(records: Sequence[ApiKeyRecord]) -> bytes:
    doc = {"format": API_KEYS_FORMAT, "keys": [r.to_dict() for r in records]}
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


class ApiKeyStore:
    """Which institution an API key spends for. Holds only sha256 digests, never keys."""

    def __init__(self, records: Sequence[ApiKeyRecord]) -> None:
        self.records: tuple[ApiKeyRecord, ...] = tuple(records)

    @classmethod
    def load(cls, path: Path | str) -> ApiKeyStore:
        path = Path(path)
        raw = _read(path, "API key file")
        try:
            doc = json.loads(raw)
            if doc.get("format") != API_KEYS_FORMAT:
                raise ValueError(f"format is not {API_KEYS_FORMAT!r}")
            records = [
                ApiKeyRecord(
                    sha256=str(item["sha256"]),
                    institution=str(item["institution"]),
                    created_at=float(item["created_at"]),
                    revoked=bool(item["revoked"]),
                )
                for item in doc["keys"]
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"{path} is not a valid API key file: {exc}") from exc
        return cls(records)

    def resolve(self, key: str) -> str | None:
        """The institution of a live key, or None."""
        return self.resolve_digest(api_key_digest(key))

    def resolve_digest(self, digest: str) -> str | None:
        """The institution of the live key with this digest, or None. Compares every digest in constant time."""
        found: str | None = None
        for record in self.records:
            if hmac.compare_digest(record.sha256, digest) and not record.revoked:
                found = record.institution
        return found


def create_api_key(pool_dir: Path | str, institution: str) -> str:
    """A new API key for a current member; only its sha256 is stored, so show it to the user now."""
    pool = PoolInfo.load(pool_dir)
    record_path, _ = _member_paths(pool.directory, _check_name("institution", institution))
    with _pool_lock(pool.directory):
        if not record_path.exists():
            raise InvalidInput(f"no member {institution!r} in pool {pool.name!r}; add it with `coop member add`")
        if institution in read_revocations(pool).revoked:
            raise Unauthorized(f"membership of {institution!r} has been revoked; it cannot get API keys")
        path = pool.directory / API_KEYS_FILE
        store = ApiKeyStore.load(path)
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKeyRecord(sha256=api_key_digest(key), institution=institution, created_at=time.time())
        _replace_file(path, _api_keys_json([*store.records, record]), 0o600)
    return key


def _revoke_keys_locked(pool_dir: Path, institution: str) -> int:
    path = pool_dir / API_KEYS_FILE
    store = ApiKeyStore.load(path)
    count = sum(1 for r in store.records if r.institution == institution and not r.revoked)
    if count:
        records = [
            ApiKeyRecord(r.sha256, r.institution, r.created_at, True) if r.institution == institution else r
            for r in store.records
        ]
        _replace_file(path, _api_keys_json(records), 0o600)
    return count


def revoke_api_keys(pool_dir: Path | str, institution: str) -> int:
    """Revoke every API key of institution; returns how many were live."""
    pool = PoolInfo.load(pool_dir)
    _check_name("institution", institution)
    with _pool_lock(pool.directory):
        return _revoke_keys_locked(pool.directory, institution)


def revoke_api_key(pool_dir: Path | str, sha256: str) -> ApiKeyRecord:
    """Revoke the one API key with this digest; returns its record as it was (``.revoked``: already was)."""
    pool = PoolInfo.load(pool_dir)
    with _pool_lock(pool.directory):
        path = pool.directory / API_KEYS_FILE
        store = ApiKeyStore.load(path)
        found = next((r for r in store.records if hmac.compare_digest(r.sha256, sha256)), None)
        if found is None:
            raise InvalidInput(f"no API key with digest {sha256[:12]!r} in pool {pool.name!r}")
        if not found.revoked:
            records = [
                ApiKeyRecord(r.sha256, r.institution, r.created_at, True) if r is found else r for r in store.records
            ]
            _replace_file(path, _api_keys_json(records), 0o600)
    return found
