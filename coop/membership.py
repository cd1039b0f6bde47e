"""What a process does differently when it belongs to a pool: TLS, signing, verifying, vetting peers.

`Membership.load(bundle_path)` gives everything a node or coordinator needs from its member
bundle; `Membership.development()` is the plaintext, unsigned mode for a laptop, used when no
bundle is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from coop.config import DEFAULT_POOL_ID
from coop.errors import Unauthorized
from coop.identity import AnnouncementVerifier, MemberBundle, peer_institution, sign_announcement
from coop.node.directory import NodeAnnouncement
from coop.wire.channels import ChannelSecurity


@dataclass(frozen=True)
class Membership:
    pool_id: str
    institution: str
    bundle: MemberBundle | None

    @classmethod
    def load(cls, bundle_path: Path | None, *, institution: str = "local") -> Membership:
        if bundle_path is None:
            return cls(DEFAULT_POOL_ID, institution, None)
        bundle = MemberBundle.load(bundle_path)
        return cls(bundle.pool_id, bundle.institution, bundle)

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
        return AnnouncementVerifier(self.bundle.ca_cert_pem, self.pool_id)

    def authorize(self, context: grpc.aio.ServicerContext) -> None:
        """TLS already proved the caller's certificate chains to the pool CA; name the institution."""
        if self.bundle is None:
            return
        if peer_institution(context.auth_context(), pool_id=self.pool_id) is None:
            raise Unauthorized("the caller presented no certificate of this pool")
