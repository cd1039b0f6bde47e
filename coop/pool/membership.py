"""What a process does differently when it belongs to a pool: mutual TLS and vetting its peers.

`Membership.load(bundle_path)` gives everything a node or coordinator needs from its bundle (a
node's own certificate included); without a bundle it is the plaintext development mode. Signing and checking DHT
announcements with it is the swarm's job (`coop.swarm.announcement`), and so is keeping its
revocation list fresh from the DHT (`coop.swarm.revocations`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from coop.config import DEFAULT_POOL_ID
from coop.errors import InvalidInput, Unauthorized
from coop.pool.bundle import Credentials, MemberBundle
from coop.pool.ca import ROLE_COORDINATOR
from coop.pool.identity import Identity, peer_identity
from coop.pool.revocation import Revocations, saved_revocations_path
from coop.wire.channels import ChannelSecurity


@dataclass(frozen=True)
class Membership:
    pool_id: str
    institution: str
    bundle: MemberBundle | None
    revocations: Revocations
    credentials: Credentials | None = None  # what this process presents and signs with

    @classmethod
    def load(
        cls,
        bundle_path: Path | None,
        *,
        node_id: str | None = None,
        institution: str = "local",
        pool_id: str = DEFAULT_POOL_ID,
    ) -> Membership:
        """The bundle decides pool and institution; without one, the given (development) values do.

        A node passes its node_id: it gets a certificate of its own, made from its member's bundle.
        Without one, a member's bundle only reads the pool (its CA and revocations): it cannot call
        nodes or serve.
        """
        if bundle_path is None:
            return cls(pool_id, institution, None, Revocations(None, pool_id))
        bundle = MemberBundle.load(bundle_path)
        revocations = Revocations.load(
            bundle.ca_cert_pem, bundle.pool_id, saved_revocations_path(bundle_path), bundle.revocations
        )
        role = bundle.identity.role
        credentials = bundle.credentials(node_id) if node_id is not None or role == ROLE_COORDINATOR else None
        return cls(bundle.pool_id, bundle.institution, bundle, revocations, credentials)

    @property
    def secure(self) -> bool:
        return self.bundle is not None

    def require(self, role: str) -> Membership:
        """This process must hold `role` in its pool (development mode holds every role)."""
        if self.bundle is not None and self.bundle.identity.role != role:
            raise InvalidInput(
                f"the bundle of {self.institution!r} is a {self.bundle.identity.role}'s, not a {role}'s; "
                f"a pool coordinator needs a coordinator bundle (coop member add NAME --coordinator)"
            )
        return self

    def _own(self) -> Credentials:
        if self.credentials is None:
            raise InvalidInput(f"the member bundle of {self.institution!r} needs a node id to act in the pool")
        return self.credentials

    def channel_security(self) -> ChannelSecurity:
        if self.bundle is None:
            return ChannelSecurity()
        credentials = self._own()
        return ChannelSecurity(credentials.channel_credentials(), credentials.node_tls_name)

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.bundle is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self._own().server_credentials())

    def authorize(self, context: grpc.aio.ServicerContext) -> Identity | None:
        """Who is calling (None in development mode); Unauthorized if no one of this pool, or revoked.

        TLS already proved the caller's chain leads to the pool CA; this names it and checks it
        against the revocation list, which TLS does not know.
        """
        if self.bundle is None:
            return None
        peer = peer_identity(context.auth_context(), self.bundle.ca_cert_pem, pool_id=self.pool_id)
        if peer is None:
            raise Unauthorized("the caller presented no node or coordinator certificate of this pool")
        if peer.institution in self.revocations.names:
            raise Unauthorized(f"{peer.institution} has been revoked from this pool")
        return peer
