"""Small synchronous calls to a node, for the CLI and tests."""

from __future__ import annotations

import grpc

from coop.errors import PeerError
from coop.wire.channels import ChannelSecurity
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc


def node_info(
    endpoint: str,
    security: ChannelSecurity | None = None,
    *,
    institution: str = "",
    node_id: str = "",
    timeout_s: float = 5.0,
) -> pb.NodeInfo:
    """A node's NodeInfo. In a pool, the node must prove it is `node_id` of `institution`, and it
    answers only callers with a certificate of the pool."""
    security = security or ChannelSecurity()
    options = security.options(security.target_name(institution, node_id))
    if security.credentials is None:
        channel = grpc.insecure_channel(endpoint, options=options)
    else:
        channel = grpc.secure_channel(endpoint, security.credentials, options=options)
    with channel:
        try:
            return coop_pb2_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise PeerError(f"node at {endpoint} did not answer ({exc.code().name}): {exc.details()}") from exc
