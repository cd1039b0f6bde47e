"""Small synchronous calls to a node, for the CLI and tests."""

from __future__ import annotations

import grpc

from coop.errors import PeerError
from coop.wire.channels import GRPC_OPTIONS
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc


def node_info(endpoint: str, timeout_s: float = 5.0) -> pb.NodeInfo:
    with grpc.insecure_channel(endpoint, options=GRPC_OPTIONS) as channel:
        try:
            return coop_pb2_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise PeerError(f"node at {endpoint} did not answer: {exc}") from exc
