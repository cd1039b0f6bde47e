"""A member bundle: what the pool admin hands an institution (its certificate and key, the pool CA
and the pool's config and limits), and what a node or coordinator loads to take part."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import grpc
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coop.errors import InvalidInput, Unauthorized
from coop.pool.ca import (
    ROLE_COORDINATOR,
    ROLE_MEMBER,
    SIGNATURE_HASH,
    ec_public_key,
    key_pem,
    load_cert,
    node_certificate,
    node_tls_name,
)
from coop.pool.files import read_document
from coop.pool.identity import Identity, verify_identity
from coop.pool.revocation import RevocationList

BUNDLE_FORMAT = "coop-member-bundle/1"


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
class MemberBundle:
    """A member institution's credentials: its certificate and key, and the pool's CA and config."""

    pool_id: str
    pool_name: str
    institution: str
    ca_cert_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    bootstrap: tuple[str, ...] = ()
    limits: PoolLimits = field(default_factory=PoolLimits)
    # the pool's revocation list when the bundle was made: a process starts from it even if the DHT
    # copy is lost or attacked (checked against the CA by whoever uses it)
    revocations: RevocationList | None = None

    @classmethod
    def load(cls, path: Path | str) -> MemberBundle:
        """Read and check a bundle: well-formed, key matches certificate, certificate valid for its pool."""
        path = Path(path)
        doc = read_document(path, "coop member bundle", BUNDLE_FORMAT)
        try:
            pool = doc["pool"]
            bundle = cls(
                pool_id=str(pool["pool_id"]),
                pool_name=str(pool["name"]),
                institution=str(doc["institution"]),
                ca_cert_pem=str(doc["ca_cert_pem"]).encode("ascii"),
                cert_pem=str(doc["cert_pem"]).encode("ascii"),
                key_pem=str(doc["key_pem"]).encode("ascii"),
                bootstrap=tuple(str(addr) for addr in pool.get("bootstrap", [])),
                limits=PoolLimits.from_dict(pool.get("limits", {})),
                revocations=None if doc.get("revocations") is None else RevocationList.from_dict(doc["revocations"]),
            )
            key = bundle._private_key
        except (ValueError, KeyError, TypeError, AttributeError, InvalidInput, UnsupportedAlgorithm) as exc:
            raise InvalidInput(f"{path} is not a valid coop member bundle: {exc}") from exc
        try:
            identity = verify_identity(bundle.ca_cert_pem, bundle.cert_pem, pool_id=bundle.pool_id)
        except Unauthorized as exc:
            raise Unauthorized(f"member bundle {path}: {exc}; ask the pool admin for a new one") from exc
        if identity.role not in (ROLE_MEMBER, ROLE_COORDINATOR) or identity.institution != bundle.institution:
            raise InvalidInput(f"{path}: certificate is for {identity.describe()}, bundle says {bundle.institution!r}")
        cert_key = ec_public_key(load_cert(bundle.cert_pem, "member certificate"))
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
                "limits": self.limits.to_dict(),
            },
            "institution": self.institution,
            "ca_cert_pem": self.ca_cert_pem.decode("ascii"),
            "cert_pem": self.cert_pem.decode("ascii"),
            "key_pem": self.key_pem.decode("ascii"),
        }
        if self.revocations is not None:
            doc["revocations"] = self.revocations.to_dict()
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    @cached_property
    def _private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("member key is not an ECDSA key")
        return key

    @cached_property
    def identity(self) -> Identity:
        return verify_identity(self.ca_cert_pem, self.cert_pem, pool_id=self.pool_id)

    def sign(self, payload: bytes) -> bytes:
        """DER-encoded ECDSA/SHA-256 signature; check with verify_signature(self.cert_pem, ...)."""
        return self._private_key.sign(payload, ec.ECDSA(SIGNATURE_HASH))

    def credentials(self, node_id: str | None = None) -> Credentials:
        """What this process presents in TLS and signs with.

        A coordinator's bundle is used as is. A member's bundle is an institution's CA: each of its
        nodes gets a certificate of its own, made here for `node_id`.
        """
        if self.identity.role == ROLE_COORDINATOR:
            return Credentials(self.identity, self.ca_cert_pem, self.key_pem, self.cert_pem)
        if node_id is None:
            raise InvalidInput(
                f"the bundle of {self.institution!r} is a member's: it runs nodes; a coordinator needs a "
                "coordinator bundle (coop member add NAME --coordinator)"
            )
        member_cert = load_cert(self.cert_pem, "member certificate")
        key, cert = node_certificate(self._private_key, member_cert, self.pool_id, self.institution, node_id)
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem
        identity = verify_identity(self.ca_cert_pem, chain, pool_id=self.pool_id)
        return Credentials(identity, self.ca_cert_pem, key_pem(key), chain)


@dataclass(frozen=True)
class Credentials:
    """One process's identity in the pool: its key and the certificate chain that vouches for it."""

    identity: Identity
    ca_cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    chain_pem: bytes = field(repr=False)  # leaf first: what TLS presents and signatures carry

    @property
    def pool_id(self) -> str:
        return self.identity.pool_id

    @property
    def institution(self) -> str:
        return self.identity.institution

    @property
    def cert_pem(self) -> bytes:
        return self.chain_pem

    @cached_property
    def _private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def sign(self, payload: bytes) -> bytes:
        return self._private_key.sign(payload, ec.ECDSA(SIGNATURE_HASH))

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: clients must present a certificate chaining to the pool CA."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.chain_pem)], root_certificates=self.ca_cert_pem, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Trust only the pool CA, and present this identity's chain."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert_pem, private_key=self.key_pem, certificate_chain=self.chain_pem
        )

    def node_tls_name(self, institution: str, node_id: str) -> str:
        """The name a node of this pool must prove in TLS (see coop.pool.ca.node_tls_name)."""
        return node_tls_name(self.pool_id, institution, node_id)
