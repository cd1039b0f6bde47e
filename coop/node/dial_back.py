"""DialBack: a node dials an endpoint for a pool member, so `coop node doctor` learns whether the
member's node is reachable from the pool, not only from its own machine.

A node must never become a port scanner or a relay for whoever asks, so a dial-back is made only
for a node certificate of this pool (TLS and the revocation list have vetted it), a few times per
institution (a token bucket: `burst`, then one more every `refill_s`), at most `max_concurrent` at
once, under a short timeout, and it counts as reachable only if the far end proves in TLS to be the
named node of the caller's own institution and answers `Info` as that node.

The answer is reachable or not, and nothing more: never gRPC's error text, which tells a closed port
from an open one and a TLS service from a plain one, and would let a member map a network through
this node. Why a dial failed is logged here, for this node's operator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from coop.errors import DialBackThrottled, InvalidInput
from coop.pool.ca import ROLE_NODE
from coop.pool.identity import Identity
from coop.swarm.announcement import check_endpoint
from coop.wire.channels import ChannelSecurity
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc

log = logging.getLogger(__name__)

DIAL_TIMEOUT_S = 5.0
UNREACHABLE = "the node did not answer as itself at that endpoint"
"""The one answer for every failed dial (closed port, open port, another TLS service, another node)."""
_MAX_NODE_ID_CHARS = 128


@dataclass
class _Bucket:
    tokens: float
    updated: float


class DialBacks:
    """The dial-backs one node makes for members, within its per-institution and concurrency budgets."""

    def __init__(
        self,
        security: ChannelSecurity,
        *,
        burst: int = 3,
        refill_s: float = 10.0,
        max_concurrent: int = 4,
        timeout_s: float = DIAL_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._security = security
        self.burst = burst
        self.refill_s = refill_s
        self.max_concurrent = max_concurrent
        self.timeout_s = timeout_s
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}  # by institution; full buckets are dropped
        self._active = 0

    def _take(self, institution: str) -> None:
        """Spend one of the institution's dial-backs; DialBackThrottled if none is left or all slots are busy."""
        now = self._clock()
        self._buckets = {
            name: bucket
            for name, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) / self.refill_s < self.burst
        }
        bucket = self._buckets.get(institution, _Bucket(float(self.burst), now))
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) / self.refill_s)
        bucket.updated = now
        if self._active >= self.max_concurrent:
            raise DialBackThrottled(f"this node is already making {self._active} dial-backs; try again in a minute")
        if bucket.tokens < 1:
            wait_s = (1 - bucket.tokens) * self.refill_s
            raise DialBackThrottled(f"{institution!r} used its dial-backs on this node; try again in {wait_s:.0f} s")
        bucket.tokens -= 1
        self._buckets[institution] = bucket

    async def dial(self, caller: Identity | None, request: pb.DialBackRequest) -> pb.DialBackReply:
        """Whether node `request.node_id` of the caller's institution answers at `request.endpoint`."""
        credentials = self._security.credentials
        if caller is None or credentials is None:
            raise InvalidInput("dial-backs are made only in a pool (this node runs without a member bundle)")
        caller.require(ROLE_NODE)
        try:
            endpoint = check_endpoint(request.endpoint)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        if not 0 < len(request.node_id) <= _MAX_NODE_ID_CHARS:
            raise InvalidInput(f"node_id must be 1-{_MAX_NODE_ID_CHARS} characters")
        self._take(caller.institution)
        self._active += 1
        try:
            why_not = await self._reach(credentials, endpoint, caller.institution, request.node_id)
        finally:
            self._active -= 1
        if why_not:
            log.info("dial-back to %s for %s failed: %s", endpoint, caller.describe(), why_not)
        return pb.DialBackReply(
            reachable=not why_not, error=UNREACHABLE if why_not else "", peer_time_unix_s=time.time()
        )

    async def _reach(self, credentials: grpc.ChannelCredentials, endpoint: str, institution: str, node_id: str) -> str:
        """'' if the node answers as itself at endpoint, else why not (for this node's log only)."""
        options = self._security.options(self._security.target_name(institution, node_id))
        async with grpc.aio.secure_channel(endpoint, credentials, options=options) as channel:
            try:
                info = await coop_pb2_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
        if info.node_id != node_id:
            return f"the node at {endpoint} answered as {info.node_id!r}, not {node_id!r}"
        return ""
