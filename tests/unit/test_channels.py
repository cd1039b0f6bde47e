"""The channel pool stays bounded: least recently used idle channels go first, busy ones last."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import torch

from coop.model.engine import SpanEngine
from coop.wire.channels import ChannelPool
from coop.wire.generated import coop_pb2 as pb
from tests.node_harness import NodeInThread, step

NOWHERE = "127.0.0.1:{}"  # channels connect lazily: these never dial


def test_idle_channels_are_closed_least_recently_used_first() -> None:
    async def run() -> None:
        pool = ChannelPool(max_channels=2)
        for port in (1, 2, 3):
            pool.stub(NOWHERE.format(port), "", "")
        assert (len(pool), pool.evicted) == (2, 1)  # 1 is gone
        pool.stub(NOWHERE.format(2), "", "")  # used again: now the most recent
        pool.stub(NOWHERE.format(1), "", "")  # so 3 goes
        assert pool.evicted == 2
        pool.stub(NOWHERE.format(2), "", "")
        assert pool.evicted == 2  # 2 was kept
        pool.stub(NOWHERE.format(3), "", "")
        assert (len(pool), pool.evicted) == (2, 3)
        await pool.close()
        assert len(pool) == 0

    asyncio.run(run())


def test_a_channel_with_a_call_in_progress_outlives_idle_ones(tiny_llama_dir: str) -> None:
    with NodeInThread(SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")) as node:
        asyncio.run(_busy_channel(node))


async def _open_session(pool: ChannelPool, node: NodeInThread) -> Any:
    """Session "s" open on the node through the pool: its stream keeps the node's channel busy."""
    session = pool.stub(node.endpoint, "", "").Session()
    await session.write(pb.SessionControl(open=pb.SessionControl.Open(session_id="s", max_length=8, start=0, end=6)))
    assert (await session.read()).WhichOneof("kind") == "opened"
    return session


async def _busy_channel(node: NodeInThread) -> None:
    pool = ChannelPool(max_channels=2)
    session = await _open_session(pool, node)
    pool.stub(NOWHERE.format(1), "", "")
    pool.stub(NOWHERE.format(2), "", "")  # the node's channel is the least recently used, but busy: 1 goes
    assert pool.evicted == 1
    ack = await pool.stub(node.endpoint, "", "").Forward(step("s", 1, torch.zeros(1, 1, 64), 0), timeout=10)
    assert not ack.HasField("error") and pool.evicted == 1  # the same channel, still pooled
    assert (await session.read()).WhichOneof("kind") == "result"
    await session.done_writing()
    assert await session.read() is grpc.aio.EOF
    pool.stub(NOWHERE.format(3), "", "")  # 2 goes
    pool.stub(NOWHERE.format(4), "", "")  # the node's channel, idle now and least recently used, goes
    assert pool.evicted == 3
    pool.stub(node.endpoint, "", "")  # so it must be dialled anew
    assert pool.evicted == 4
    await pool.close()


def test_when_every_channel_is_busy_the_oldest_still_goes_after_a_grace(tiny_llama_dir: str) -> None:
    with NodeInThread(SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")) as node:
        asyncio.run(_all_busy(node))


async def _all_busy(node: NodeInThread) -> None:
    pool = ChannelPool(max_channels=1)
    session = await _open_session(pool, node)
    pool.stub(NOWHERE.format(1), "", "")  # over the limit: the busy channel goes, its call may finish
    assert (len(pool), pool.evicted) == (1, 1)
    ack = await pool.stub(node.endpoint, "", "").Forward(step("s", 1, torch.zeros(1, 1, 64), 0), timeout=10)
    assert not ack.HasField("error")
    assert (await session.read()).WhichOneof("kind") == "result"  # the evicted channel's call goes on
    await session.done_writing()
    assert await session.read() is grpc.aio.EOF
    await pool.close()
