"""DialBacks' guards, without a network: who may ask, what endpoints, and how often."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from coop.errors import DialBackThrottled, InvalidInput, Unauthorized
from coop.node.dial_back import UNREACHABLE, DialBacks
from coop.pool.ca import ROLE_COORDINATOR, ROLE_NODE
from coop.pool.identity import Identity
from coop.wire.channels import ChannelSecurity
from coop.wire.generated import coop_pb2 as pb

BURST = 2
REFILL_S = 10.0
NODE = Identity("pool", ROLE_NODE, "Uni A", "doctor-1")
# nothing listens on port 1, so a dial that gets past the guards ends at once, unreachable
REQUEST = pb.DialBackRequest(endpoint="127.0.0.1:1", node_id="doctor-1")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _dial_backs(clock: FakeClock) -> DialBacks:
    security = ChannelSecurity(grpc.ssl_channel_credentials(), lambda institution, node_id: f"{node_id}.test")
    return DialBacks(security, burst=BURST, refill_s=REFILL_S, timeout_s=2.0, clock=clock)


def test_each_institution_gets_a_few_dial_backs_then_one_per_refill() -> None:
    clock = FakeClock()
    dial_backs = _dial_backs(clock)
    for _ in range(BURST):
        reply = asyncio.run(dial_backs.dial(NODE, REQUEST))
        assert not reply.reachable and reply.error == UNREACHABLE
    with pytest.raises(DialBackThrottled, match="try again in 10 s"):
        asyncio.run(dial_backs.dial(NODE, REQUEST))
    other = Identity("pool", ROLE_NODE, "Uni B", "doctor-2")  # another institution has its own budget
    asyncio.run(dial_backs.dial(other, pb.DialBackRequest(endpoint="127.0.0.1:1", node_id="doctor-2")))
    clock.now += REFILL_S
    asyncio.run(dial_backs.dial(NODE, REQUEST))
    with pytest.raises(DialBackThrottled):
        asyncio.run(dial_backs.dial(NODE, REQUEST))


def test_only_pool_nodes_may_ask_and_only_for_an_endpoint() -> None:
    dial_backs = _dial_backs(FakeClock())
    with pytest.raises(Unauthorized):
        asyncio.run(dial_backs.dial(Identity("pool", ROLE_COORDINATOR, "Coord"), REQUEST))
    with pytest.raises(InvalidInput, match="only in a pool"):
        asyncio.run(dial_backs.dial(None, REQUEST))
    with pytest.raises(InvalidInput, match="host:port"):
        asyncio.run(dial_backs.dial(NODE, pb.DialBackRequest(endpoint="no-port", node_id="doctor-1")))
    with pytest.raises(InvalidInput, match="node_id"):
        asyncio.run(dial_backs.dial(NODE, pb.DialBackRequest(endpoint="127.0.0.1:1", node_id="")))
