"""The CA-signed revocation list of a pool, and the newest one a running process has accepted.

A revocation must survive the loss of any one copy: the admin keeps revocations.json in the pool
directory, new member bundles carry the list current when they were made, every process keeps the
newest list it accepted on disk next to its bundle (`saved_revocations_path`) and reloads it at
start, and the DHT spreads it. So a DHT outage or attack delays news of a revocation, but never
un-revokes anyone a process already knew about.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from coop.errors import CoopError, InvalidInput, Unauthorized
from coop.pool.ca import SIGNATURE_HASH, load_cert, pool_of_ca, verify_signature
from coop.pool.files import read_file, replace_file

log = logging.getLogger(__name__)

_REVOCATIONS_DOMAIN = b"coop-revocations-v1\n"  # domain separation: never valid as another signature


@dataclass(frozen=True)
class RevocationList:
    """The CA-signed list of revoked institutions (and their certificate serials, in hex) of one pool.

    Each revoked institution carries the time it was revoked (`revoked_at`), signed with the list:
    the cutoff after which its work is not paid. A later revocation re-signs the list with a later
    issued_at but leaves earlier entries' times alone.
    """

    pool_id: str
    revoked: tuple[str, ...] = ()
    serials: tuple[str, ...] = ()
    issued_at: float = 0.0
    signature: bytes = field(default=b"", repr=False)
    revoked_at: tuple[tuple[str, float], ...] = ()  # (institution, unix seconds), one per entry of revoked

    def revoked_since(self, institution: str) -> float | None:
        """When institution was revoked (unix seconds), or None if it is not.

        A list signed before entries carried their time gives its own issued_at: never earlier than
        the revocation itself, so no work before a revocation goes unpaid.
        """
        if institution not in self.revoked:
            return None
        return dict(self.revoked_at).get(institution, self.issued_at)

    def _unsigned(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "pool_id": self.pool_id,
            "revoked": list(self.revoked),
            "serials": list(self.serials),
            "issued_at": self.issued_at,
        }
        if self.revoked_at:  # absent from lists signed before entries carried their time: their signatures hold
            doc["revoked_at"] = dict(self.revoked_at)
        return doc

    def payload(self) -> bytes:
        """The canonical bytes the CA signs: everything but the signature."""
        body = json.dumps(self._unsigned(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return _REVOCATIONS_DOMAIN + body.encode()

    def signed(self, ca_key: ec.EllipticCurvePrivateKey) -> RevocationList:
        return replace(self, signature=ca_key.sign(self.payload(), ec.ECDSA(SIGNATURE_HASH)))

    def to_dict(self) -> dict[str, object]:
        """The JSON document of revocations.json (also embedded in member bundles)."""
        return {**self._unsigned(), "signature": base64.b64encode(self.signature).decode("ascii")}

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise InvalidInput(f"malformed revocation list: {exc}") from exc
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RevocationList:
        """Parse (not verify) a list; InvalidInput on anything malformed."""
        try:
            revoked, serials = doc["revoked"], doc["serials"]
            if not all(isinstance(x, str) for x in [*revoked, *serials]):
                raise TypeError("revoked and serials must be lists of strings")
            revoked_at = doc.get("revoked_at", {})
            if not isinstance(revoked_at, Mapping) or not set(revoked_at) <= set(revoked):
                raise TypeError("revoked_at must map revoked institutions to times")
            return cls(
                pool_id=str(doc["pool_id"]),
                revoked=tuple(revoked),
                serials=tuple(serials),
                issued_at=_time(doc["issued_at"], "issued_at"),
                signature=base64.b64decode(doc["signature"], validate=True),
                revoked_at=tuple((name, _time(when, "revoked_at")) for name, when in revoked_at.items()),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"malformed revocation list: {exc}") from exc

    def verify(self, ca_cert_pem: bytes) -> None:
        """Unauthorized unless this list is signed by the given pool CA and is for that CA's pool."""
        ca = load_cert(ca_cert_pem, "pool CA certificate")
        ca_pool = pool_of_ca(ca)
        if ca_pool != self.pool_id:
            raise Unauthorized(f"revocation list is for pool {self.pool_id!r}, the CA is of pool {ca_pool!r}")
        try:
            verify_signature(ca_cert_pem, self.payload(), self.signature)
        except Unauthorized as exc:
            raise Unauthorized("revocation list is not signed by the pool CA") from exc

    @classmethod
    def load(cls, path: Path | str, ca_cert_pem: bytes) -> RevocationList:
        """Read and verify a revocations.json (e.g. a copy the admin distributed)."""
        revocations = cls.from_bytes(read_file(Path(path), "revocation list"))
        revocations.verify(ca_cert_pem)
        return revocations


def _time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"{what} must be a finite number")
    return float(value)


def saved_revocations_path(bundle_path: Path) -> Path:
    """Where a process run with bundle_path keeps the newest list it accepted (e.g. alpha.revocations).

    An admin may also copy the pool's revocations.json there to hand a member a list by hand.
    """
    return bundle_path.with_suffix(".revocations")


class Revocations:
    """The newest revocation list signed by the pool CA that this process has accepted.

    Lists arrive from anywhere (the DHT, a member bundle, a file the admin distributed); only one that
    verifies against the pool CA, is for this pool and is newer than the current one replaces it, and
    is then saved to `path` (when given) so that the next start begins from it.
    """

    def __init__(self, ca_cert_pem: bytes | None, pool_id: str, path: Path | None = None) -> None:
        self.ca_cert_pem = ca_cert_pem
        self.pool_id = pool_id
        self.path = path
        self.current: RevocationList | None = None
        self.issued_at = 0.0
        self.names: frozenset[str] = frozenset()

    @classmethod
    def load(cls, ca_cert_pem: bytes, pool_id: str, path: Path, carried: RevocationList | None = None) -> Revocations:
        """Start from the newest of carried (a bundle's list) and the list saved at path.

        A saved list that does not verify is an error, not something to skip: starting without it
        could serve a revoked member.
        """
        revocations = cls(ca_cert_pem, pool_id, path)
        if path.exists():  # first, so that carried cannot replace a broken file before it is noticed
            try:
                revocations.offer(RevocationList.load(path, ca_cert_pem))
            except CoopError as exc:
                raise InvalidInput(
                    f"saved revocation list {path} is not usable ({exc}); replace it with the pool's revocations.json"
                ) from exc
        if carried is not None:
            revocations.offer(carried)
        return revocations

    def __call__(self) -> frozenset[str]:
        return self.names

    def revoked_since(self, institution: str) -> float | None:
        """When institution was revoked, as the current list tells it; None if it is not (or no list yet)."""
        return None if self.current is None else self.current.revoked_since(institution)

    def offer(self, candidate: RevocationList) -> bool:
        """Accept candidate if it is this pool's, signed by its CA and newer; Unauthorized if not signed."""
        if self.ca_cert_pem is None:
            return False
        candidate.verify(self.ca_cert_pem)
        if candidate.pool_id != self.pool_id or candidate.issued_at <= self.issued_at:
            return False
        self.current, self.issued_at, self.names = candidate, candidate.issued_at, frozenset(candidate.revoked)
        self._save(candidate)
        return True

    def _save(self, revocations: RevocationList) -> None:
        """Keep revocations at path unless a list as new is there already (another process of ours)."""
        if self.path is None or self.ca_cert_pem is None:
            return
        with contextlib.suppress(CoopError):
            if RevocationList.load(self.path, self.ca_cert_pem).issued_at >= revocations.issued_at:
                return
        try:
            replace_file(self.path, revocations.to_bytes(), 0o644)
        except (OSError, CoopError) as exc:
            log.warning("could not save the revocation list to %s: %s", self.path, exc)
