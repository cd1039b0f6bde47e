"""What a process does differently when it belongs to a pool: mutual TLS and vetting its peers.

`Membership.load(bundle_path)` gives everything a node or coordinator needs from its member
bundle; without a bundle it is the plaintext development mode. Signing and checking DHT
announcements with it is the swarm's job (`coop.swarm.announcement`), and so is keeping its
revocation list fresh from the DHT (`coop.swarm.revocations`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from coop.config import DEFAULT_POOL_ID
from coop.errors import Unauthorized
from coop.pool.bundle import MemberBundle
from coop.pool.ca import peer_institution
from coop.pool.revocation import Revocations, saved_revocations_path
from coop.wire.channels import ChannelSecurity


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
        revocations = Revocations.load(
            bundle.ca_cert_pem, bundle.pool_id, saved_revocations_path(bundle_path), bundle.revocations
        )
        return cls(bundle.pool_id, bundle.institution, bundle, revocations)

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
