"""Small synchronous calls to a node, for the CLI and tests."""

from __future__ import annotations

import grpc

from coop.errors import PeerError, Unauthorized
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
    with _channel(endpoint, security, institution, node_id) as channel:
        try:
            return coop_pb2_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise PeerError(f"node at {endpoint} did not answer ({exc.code().name}): {exc.details()}") from exc


def node_control(
    endpoint: str,
    action: pb.ControlRequest.Action,
    security: ChannelSecurity | None = None,
    *,
    institution: str = "",
    node_id: str = "",
    timeout_s: float = 5.0,
) -> pb.ControlReply:
    """Drain, pause or resume a node, as its owner: at "host:port" with a certificate of its institution,
    or at "unix:PATH", its control socket. Unauthorized if the node refuses the caller."""
    with _channel(endpoint, security, institution, node_id) as channel:
        try:
            return coop_pb2_grpc.NodeStub(channel).Control(pb.ControlRequest(action=action), timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise Unauthorized(f"node at {endpoint} refused: {exc.details()}") from exc
            raise PeerError(f"node at {endpoint} did not answer ({exc.code().name}): {exc.details()}") from exc


def _channel(endpoint: str, security: ChannelSecurity | None, institution: str, node_id: str) -> grpc.Channel:
    security = security or ChannelSecurity()
    options = security.options(security.target_name(institution, node_id))
    if security.credentials is None:
        return grpc.insecure_channel(endpoint, options=options)
    return grpc.secure_channel(endpoint, security.credentials, options=options)
