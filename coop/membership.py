"""What a process does differently when it belongs to a pool: TLS, signing, verifying, vetting peers.

`Membership.load(bundle_path)` gives everything a node or coordinator needs from its member
bundle; without a bundle it is the plaintext, unsigned development mode.

Revocation: the pool CA signs a list of revoked institutions; `coop member revoke` publishes it
in the DHT, and every member process re-reads it every `REVOCATION_POLL_S` seconds (keeping the
newest list whose signature checks out). A revoked institution's nodes then drop out of routes,
sessions through them fail over, and its certificates are refused at every call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from coop.config import DEFAULT_POOL_ID
from coop.errors import CoopError, Unauthorized
from coop.identity import AnnouncementVerifier, MemberBundle, RevocationList, peer_institution, sign_announcement
from coop.node.directory import NodeAnnouncement, SwarmDirectory
from coop.wire.channels import ChannelSecurity

log = logging.getLogger(__name__)


REVOCATION_POLL_S = 10.0
REVOCATION_TTL_S = 365 * 24 * 3600.0


def revocations_key(pool_id: str) -> str:
    return f"coop/v1/pools/{pool_id}/revocations"


class Revocations:
    """The newest revocation list signed by the pool CA that this process has seen."""

    def __init__(self, ca_cert_pem: bytes | None, pool_id: str) -> None:
        self._ca_cert_pem = ca_cert_pem
        self._pool_id = pool_id
        self._issued_at = 0.0
        self.names: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self) -> frozenset[str]:
        return self.names

    def refresh(self, directory: SwarmDirectory) -> None:
        if self._ca_cert_pem is None:
            return
        try:
            blobs = directory.fetch_blobs(revocations_key(self._pool_id))
        except CoopError as exc:
            log.warning("could not read the revocation list from the DHT: %s", exc)
            return
        for blob in blobs:
            try:
                candidate = RevocationList.from_bytes(blob)
                candidate.verify(self._ca_cert_pem)
            except Exception as exc:  # anyone can write to the DHT: no blob may stop the watcher
                log.warning("ignoring a revocation list that does not verify: %s", type(exc).__name__)
                continue
            if candidate.pool_id == self._pool_id and candidate.issued_at > self._issued_at:
                self._issued_at, self.names = candidate.issued_at, frozenset(candidate.revoked)
                log.warning("revoked institutions now: %s", sorted(self.names))

    def watch(self, directory: SwarmDirectory, period_s: float = REVOCATION_POLL_S) -> None:
        """Refresh now, then every period_s in a background thread until stop()."""
        self.refresh(directory)
        if self._ca_cert_pem is None:
            return

        def loop() -> None:
            while not self._stop.wait(period_s):
                try:
                    self.refresh(directory)
                except Exception:
                    log.exception("refreshing the revocation list failed; trying again in %.0f s", period_s)

        self._thread = threading.Thread(target=loop, name="coop-revocations", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def publish_revocations(directory: SwarmDirectory, revocations: RevocationList) -> bool:
    expires_at = max(revocations.issued_at, time.time()) + REVOCATION_TTL_S
    key = revocations_key(revocations.pool_id)
    return directory.publish_blob(key, f"{revocations.issued_at:.6f}", revocations.to_bytes(), expires_at)


@dataclass(frozen=True)
class Membership:
    pool_id: str
    institution: str
    bundle: MemberBundle | None
    revocations: Revocations

    @classmethod
    def load(
        cls, bundle_path: Path | None, *, institution: str = "local", pool_id: str = DEFAULT_POOL_ID
    ) -> Membership:
        """The bundle decides pool and institution; without one, the given (development) values do."""
        if bundle_path is None:
            return cls(pool_id, institution, None, Revocations(None, pool_id))
        bundle = MemberBundle.load(bundle_path)
        return cls(bundle.pool_id, bundle.institution, bundle, Revocations(bundle.ca_cert_pem, bundle.pool_id))

    @property
    def secure(self) -> bool:
        return self.bundle is not None

    def channel_security(self) -> ChannelSecurity:
        if self.bundle is None:
            return ChannelSecurity()
        return ChannelSecurity(self.bundle.channel_credentials(), self.bundle.channel_options())

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.bundle is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.bundle.server_credentials())

    def sign(self, announcement: NodeAnnouncement) -> NodeAnnouncement:
        return announcement if self.bundle is None else sign_announcement(self.bundle, announcement)

    def announcement_validator(self) -> Callable[[NodeAnnouncement], bool] | None:
        """Readers in a pool keep only records signed by a member of this pool."""
        if self.bundle is None:
            return None
        return AnnouncementVerifier(self.bundle.ca_cert_pem, self.pool_id, revoked=self.revocations)

    def authorize(self, context: grpc.aio.ServicerContext) -> str | None:
        """TLS already proved the caller's certificate chains to the pool CA: name its institution."""
        if self.bundle is None:
            return None
        institution = peer_institution(context.auth_context(), pool_id=self.pool_id)
        if institution is None:
            raise Unauthorized("the caller presented no certificate of this pool")
        if institution in self.revocations.names:
            raise Unauthorized(f"{institution} has been revoked from this pool")
        return institution
