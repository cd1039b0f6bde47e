"""The pool directory: the administrator's registry of a pool, its members, their API keys and revocations.

Nothing in it is ever overwritten in place by ``create_pool`` or ``add_member``, and every secret is
created with mode 0600 from the first byte::

    pool.toml               pool id, name, bootstrap peers, limits, sha256 of the admin token
    ca.key          0600    the pool CA's private key: whoever holds it can admit members
    ca.crt                  self-signed pool CA certificate (SAN URI coop://<pool_id>/ca)
    admin.token     0600    the admin credential (shown once by `coop pool init`)
    ledger.url      0600    the ledger's database URL, if not ledger.db here (coop.ledger.database); never shared
    revocations.json        CA-signed list of revoked institutions and certificate serials
    api_keys.json   0600    sha256 of every API key with its institution; never a key itself
    members/<name>.json     public record of a member certificate (serial, validity, PEM)
    members/<name>.bundle   0600: what the admin hands the member: pool config, CA cert, member cert + key
    coordinators/<name>.*   the same for the pool's coordinators (coordinator certificates)
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import secrets
import time
import tomllib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coop.errors import InvalidInput, Unauthorized
from coop.pool.api_keys import API_KEY_PREFIX, ApiKeyRecord, ApiKeyStore, api_key_digest, api_keys_json
from coop.pool.bundle import MemberBundle, PoolLimits
from coop.pool.ca import (
    DEFAULT_MAX_NODES,
    ROLE_COORDINATOR,
    ROLE_MEMBER,
    ca_certificate,
    coordinator_certificate,
    key_pem,
    load_cert,
    member_certificate,
    new_key,
)
from coop.pool.files import check_name, check_text, create_file, pool_lock, read_file, replace_file, secret_digest
from coop.pool.revocation import RevocationList

POOL_FILE = "pool.toml"
CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
ADMIN_TOKEN_FILE = "admin.token"
REVOCATIONS_FILE = "revocations.json"
API_KEYS_FILE = "api_keys.json"
MEMBERS_DIR = "members"
COORDINATORS_DIR = "coordinators"
RESERVED_INSTITUTION = "pool"  # the ledger's pool account (coop.ledger.models.POOL_ACCOUNT)


def _toml_str(value: str) -> str:
    # A JSON string of printable text (no control chars, no DEL) is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class PoolInfo:
    """What pool.toml says. ``admin_token`` is set only on the value create_pool returns."""

    directory: Path
    pool_id: str
    name: str
    bootstrap: tuple[str, ...]
    limits: PoolLimits
    admin_token_sha256: str
    admin_token: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, directory: Path | str) -> PoolInfo:
        directory = Path(directory)
        path = directory / POOL_FILE
        raw = read_file(path, "pool configuration")
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
            return cls(
                directory=directory,
                pool_id=str(doc["pool_id"]),
                name=str(doc["name"]),
                bootstrap=tuple(str(addr) for addr in doc.get("bootstrap", [])),
                limits=PoolLimits.from_dict(doc.get("limits", {})),
                admin_token_sha256=str(doc["admin_token_sha256"]),
            )
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
            raise InvalidInput(f"{path} is not a valid pool configuration: {exc}") from exc

    def check_admin_token(self, token: str) -> bool:
        """Constant-time check of an admin credential against the stored hash."""
        return hmac.compare_digest(secret_digest(token), self.admin_token_sha256)

    def ca_cert_pem(self) -> bytes:
        return read_file(self.directory / CA_CERT_FILE, "pool CA certificate")

    def to_toml(self) -> str:
        lines = [
            "# Coop pool configuration, written by `coop pool init`. Safe to share with members.",
            f"pool_id = {_toml_str(self.pool_id)}",
            f"name = {_toml_str(self.name)}",
            f"bootstrap = [{', '.join(_toml_str(addr) for addr in self.bootstrap)}]",
        ]
        lines += [
            f"admin_token_sha256 = {_toml_str(self.admin_token_sha256)}",
            "",
            "[limits]",
            *(f"{key} = {value}" for key, value in self.limits.to_dict().items()),
        ]
        return "\n".join(lines) + "\n"


def create_pool(
    directory: Path | str,
    name: str,
    *,
    bootstrap: Sequence[str] = (),
    limits: PoolLimits | None = None,
) -> PoolInfo:
    """Create a new pool in directory (made if missing): CA, admin token, empty registries.

    Refuses, changing nothing, if directory already holds any pool file. The returned PoolInfo carries
    the admin token in clear; it is the only time the token is available apart from admin.token.
    """
    directory = Path(directory)
    check_name("pool name", name)
    addrs = tuple(check_text("bootstrap address", addr) for addr in bootstrap)
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
    ca_key = new_key()
    ca_cert = ca_certificate(ca_key, pool_id, name)
    token = "coop_admin_" + secrets.token_urlsafe(32)
    info = PoolInfo(
        directory=directory,
        pool_id=pool_id,
        name=name,
        bootstrap=addrs,
        limits=limits or PoolLimits(),
        admin_token_sha256=secret_digest(token),
        admin_token=token,
    )
    revocations = RevocationList(pool_id=pool_id, issued_at=time.time()).signed(ca_key)

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    create_file(directory / CA_KEY_FILE, key_pem(ca_key), 0o600)
    create_file(directory / CA_CERT_FILE, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    create_file(directory / ADMIN_TOKEN_FILE, (token + "\n").encode(), 0o600)
    create_file(directory / REVOCATIONS_FILE, revocations.to_bytes(), 0o644)
    create_file(directory / API_KEYS_FILE, api_keys_json([]), 0o600)
    (directory / MEMBERS_DIR).mkdir(mode=0o700)
    create_file(directory / POOL_FILE, info.to_toml().encode("utf-8"), 0o644)  # last: marks a complete pool
    return info


def load_ca(pool: PoolInfo) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    raw = read_file(pool.directory / CA_KEY_FILE, "pool CA key")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{pool.directory / CA_KEY_FILE} is not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInput(f"{pool.directory / CA_KEY_FILE} is not an ECDSA key")
    return key, load_cert(pool.ca_cert_pem(), "pool CA certificate")


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


def _member_paths(pool_dir: Path, institution: str, role: str = ROLE_MEMBER) -> tuple[Path, Path]:
    folder = pool_dir / (MEMBERS_DIR if role == ROLE_MEMBER else COORDINATORS_DIR)
    return folder / f"{institution}.json", folder / f"{institution}.bundle"


def add_member(
    pool_dir: Path | str, institution: str, *, role: str = ROLE_MEMBER, max_nodes: int = DEFAULT_MAX_NODES
) -> Path:
    """Admit institution: issue it a CA-signed key + certificate and write its bundle; returns the bundle path.

    role "member" (the default) makes the institution's certificate, from which its nodes make their
    own, and which caps them at max_nodes per model (readers ignore the member's nodes beyond it);
    role "coordinator" makes a pool coordinator's certificate (coordinators/<name>.bundle), the
    only kind that may open sessions on nodes and countersign receipts. The bundle holds a private
    key: hand it over out of band and delete the admin's copy if policy demands. Refuses a name
    already used for that role, even by a revoked member.
    """
    pool = PoolInfo.load(pool_dir)
    check_name("institution", institution)
    if institution.lower() == RESERVED_INSTITUTION:
        raise InvalidInput(f"{institution!r} is reserved for the pool's own ledger account; pick another name")
    if role not in (ROLE_MEMBER, ROLE_COORDINATOR):
        raise InvalidInput(f"role must be {ROLE_MEMBER!r} or {ROLE_COORDINATOR!r}, not {role!r}")
    record_path, bundle_path = _member_paths(pool.directory, institution, role)
    with pool_lock(pool.directory):
        if record_path.exists() or bundle_path.exists():
            raise InvalidInput(f"{role} {institution!r} already exists in pool {pool.name!r}; pick another name")
        record_path.parent.mkdir(mode=0o700, exist_ok=True)
        ca_key, ca_cert = load_ca(pool)
        if role == ROLE_MEMBER:
            key, cert = member_certificate(ca_key, ca_cert, pool.pool_id, institution, max_nodes)
        else:
            key, cert = coordinator_certificate(ca_key, ca_cert, pool.pool_id, institution)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        bundle = MemberBundle(
            pool_id=pool.pool_id,
            pool_name=pool.name,
            institution=institution,
            ca_cert_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
            cert_pem=cert_pem,
            key_pem=key_pem(key),
            bootstrap=pool.bootstrap,
            limits=pool.limits,
            revocations=read_revocations(pool),
        )
        create_file(bundle_path, bundle.to_bytes(), 0o600)
        record = {
            "institution": institution,
            "serial": format(cert.serial_number, "x"),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "cert_pem": cert_pem.decode("ascii"),
        }
        create_file(record_path, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode(), 0o644)
    return bundle_path


def _read_member(path: Path, revoked: Collection[str]) -> MemberInfo:
    try:
        doc = json.loads(read_file(path, "member record"))
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
    """Revoke institution's certificates (member and coordinator) and all its API keys; re-signs
    revocations.json. Idempotent: a member revoked before keeps the time it was revoked at.

    Distribute the new revocations.json to coordinators and nodes: TLS alone does not consult it.
    """
    pool = PoolInfo.load(pool_dir)
    check_name("institution", institution)
    records = [_member_paths(pool.directory, institution, role)[0] for role in (ROLE_MEMBER, ROLE_COORDINATOR)]
    with pool_lock(pool.directory):
        serials = {_read_member(path, ()).serial for path in records if path.exists()}
        if not serials:
            raise InvalidInput(f"no member {institution!r} in pool {pool.name!r}; see `coop member list`")
        ca_key, _ = load_ca(pool)
        current = read_revocations(pool)
        now = time.time()
        revoked = sorted({*current.revoked, institution})
        updated = RevocationList(
            pool_id=pool.pool_id,
            revoked=tuple(revoked),
            serials=tuple(sorted({*current.serials, *serials})),
            issued_at=now,
            revoked_at=tuple((name, _revoked_time(current, name, now)) for name in revoked),
        ).signed(ca_key)
        replace_file(pool.directory / REVOCATIONS_FILE, updated.to_bytes(), 0o644)
        _revoke_keys_locked(pool.directory, institution)
    return updated


def _revoked_time(current: RevocationList, institution: str, now: float) -> float:
    """When institution was revoked: as current says, or now if this revokes it."""
    since = current.revoked_since(institution)
    return now if since is None else since


# ----------------------------------------------------------------------------------------- member bundle


def read_revocations(pool: PoolInfo) -> RevocationList:
    """The pool directory's own revocations.json, verified against its CA."""
    return RevocationList.load(pool.directory / REVOCATIONS_FILE, pool.ca_cert_pem())


def create_api_key(pool_dir: Path | str, institution: str) -> str:
    """A new API key for a current member; only its sha256 is stored, so show it to the user now."""
    pool = PoolInfo.load(pool_dir)
    record_path, _ = _member_paths(pool.directory, check_name("institution", institution))
    with pool_lock(pool.directory):
        if not record_path.exists():
            raise InvalidInput(f"no member {institution!r} in pool {pool.name!r}; add it with `coop member add`")
        if institution in read_revocations(pool).revoked:
            raise Unauthorized(f"membership of {institution!r} has been revoked; it cannot get API keys")
        path = pool.directory / API_KEYS_FILE
        store = ApiKeyStore.load(path)
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKeyRecord(sha256=api_key_digest(key), institution=institution, created_at=time.time())
        replace_file(path, api_keys_json([*store.records, record]), 0o600)
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
        replace_file(path, api_keys_json(records), 0o600)
    return count


def revoke_api_keys(pool_dir: Path | str, institution: str) -> int:
    """Revoke every API key of institution; returns how many were live."""
    pool = PoolInfo.load(pool_dir)
    check_name("institution", institution)
    with pool_lock(pool.directory):
        return _revoke_keys_locked(pool.directory, institution)


def revoke_api_key(pool_dir: Path | str, sha256: str) -> ApiKeyRecord:
    """Revoke the one API key with this digest; returns its record as it was (``.revoked``: already was)."""
    pool = PoolInfo.load(pool_dir)
    with pool_lock(pool.directory):
        path = pool.directory / API_KEYS_FILE
        store = ApiKeyStore.load(path)
        found = next((r for r in store.records if hmac.compare_digest(r.sha256, sha256)), None)
        if found is None:
            raise InvalidInput(f"no API key with digest {sha256[:12]!r} in pool {pool.name!r}")
        if not found.revoked:
            records = [
                ApiKeyRecord(r.sha256, r.institution, r.created_at, True) if r is found else r for r in store.records
            ]
            replace_file(path, api_keys_json(records), 0o600)
    return found
