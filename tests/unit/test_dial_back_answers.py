"""A dial-back answers reachable or not, and nothing more: a closed port, an open port that speaks
no TLS, a TLS service that is not the named node, and a TLS service that is another node all get
the same answer, so a member cannot map a network through a pool node.

Real sockets and a real gRPC TLS server on 127.0.0.1, with certificates from a real pool.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from coop.node.dial_back import UNREACHABLE, DialBacks
from coop.pool.bundle import Credentials
from coop.wire.channels import ChannelSecurity
from coop.wire.generated import coop_pb2 as pb
from tests.pools import MemberPool, make_member_pool


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> MemberPool:
    return make_member_pool(tmp_path_factory.mktemp("dial-back") / "pool")


@contextmanager
def _closed_port() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"127.0.0.1:{port}"


@contextmanager
def _plain_listener() -> Iterator[str]:
    """An open TCP port that accepts and answers in plain text (no TLS)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(0.1)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def _tls_server(credentials: Credentials) -> tuple[grpc.aio.Server, str]:
    """A gRPC server with a TLS identity of the pool, but no Coop services."""
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", credentials.server_credentials())
    await server.start()
    return server, f"127.0.0.1:{port}"


def _dial_backs(pool: MemberPool) -> DialBacks:
    node = pool["alpha"].credentials("dialer")
    security = ChannelSecurity(node.channel_credentials(), node.node_tls_name)
    return DialBacks(security, burst=100, timeout_s=3.0)


def test_every_failed_dial_gets_the_same_answer(pool: MemberPool) -> None:
    dial_backs = _dial_backs(pool)
    caller = pool["beta"].credentials("beta-1").identity

    async def ask(endpoint: str) -> pb.DialBackReply:
        return await dial_backs.dial(caller, pb.DialBackRequest(endpoint=endpoint, node_id="beta-1"))

    async def dial_all() -> list[pb.DialBackReply]:
        other_node, other_node_at = await _tls_server(pool["beta"].credentials("beta-2"))  # the caller's other node
        other_member, other_member_at = await _tls_server(pool["alpha"].credentials("beta-1"))  # same id, not beta's
        try:
            with _closed_port() as closed, _plain_listener() as plain:
                return [await ask(endpoint) for endpoint in (closed, plain, other_node_at, other_member_at)]
        finally:
            await other_node.stop(None)
            await other_member.stop(None)

    replies = asyncio.run(dial_all())
    assert len(replies) == 4
    assert [(r.reachable, r.error) for r in replies] == [(False, UNREACHABLE)] * len(replies)
