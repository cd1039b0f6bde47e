"""A node announces itself as soon as its blocks are loaded, before its throughput is measured.

The real `run_node` runs in this process with its own DHT peer and gRPC server; its background
measurement is held back until the test has been served through the node, so the order is
certain: first the estimate is announced, then the measurement.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path

import pytest

from coop.config import DEFAULT_POOL_ID, NodeSettings
from coop.errors import ModelIntegrityError
from coop.model import verified
from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine
from coop.model.files import verify_file
from coop.model.manifest import Manifest
from coop.model.verified import already_verified, settled_signature
from coop.node.daemon import run_node
from coop.node.throughput import estimate_throughput, measure_throughput
from coop.pipeline.generation import collect_tokens
from coop.pipeline.local import LocalChain
from coop.pipeline.remote import RemoteChain
from coop.pipeline.sampling import SamplingParams
from coop.pool.membership import Membership
from coop.swarm.announcement import NodeAnnouncement
from coop.swarm.directory import SwarmDirectory
from coop.swarm.view import SwarmView
from coop.wire.channels import ChannelPool
from tests.waiting import wait_for

NODE_ID = "early-bird"
PROMPT = [5, 17, 42, 8, 23]
NEW_TOKENS = 6
WAIT_S = 120.0


def test_node_serves_while_its_estimate_is_announced(tiny_llama_dir: str) -> None:
    manifest = Manifest.load(tiny_llama_dir)
    blocks = manifest.num_blocks
    estimate = estimate_throughput(manifest, 0, blocks, "cpu")
    release = threading.Event()

    def held_measurement(engine: SpanEngine) -> float:
        assert release.wait(WAIT_S), "the test never released the measurement"
        return measure_throughput(engine)

    client = ClientPart.load(tiny_llama_dir, device="cpu")
    reference = asyncio.run(
        _greedy(client, LocalChain([SpanEngine.load(tiny_llama_dir, 0, blocks, device="cpu")], max_length=64))
    )

    with SwarmDirectory.start([]) as observer:
        settings = NodeSettings(
            model_dir=Path(tiny_llama_dir),
            blocks=f"0:{blocks}",
            initial_peers=tuple(observer.visible_maddrs()),
            node_id=NODE_ID,
            device="cpu",
        )

        def announced(throughput: float | None = None) -> NodeAnnouncement | None:
            for node in observer.list_nodes(DEFAULT_POOL_ID, manifest.content_hash):
                if node.node_id == NODE_ID and (throughput is None or node.throughput_tps != throughput):
                    return node
            return None

        async def scenario() -> None:
            node = asyncio.create_task(run_node(settings, measure=held_measurement))
            try:
                first = await asyncio.to_thread(wait_for, "the node's first announcement", announced, WAIT_S)
                assert first.throughput_tps == pytest.approx(estimate)
                assert (first.start, first.end) == (0, blocks)

                swarm = SwarmView(
                    observer,
                    pool_id=DEFAULT_POOL_ID,
                    model_hash=manifest.content_hash,
                    num_blocks=blocks,
                    validator=None,
                )
                await swarm.refresh()
                channels = ChannelPool(Membership.load(None).channel_security())
                try:
                    chain = RemoteChain(
                        swarm,
                        channels,
                        client.embed,
                        hidden_size=manifest.hidden_size,
                        dtype=client.dtype,
                        max_length=64,
                    )
                    assert await _greedy(client, await chain.open()) == reference
                finally:
                    await channels.close()
                assert not release.is_set()  # served while the estimate was all the swarm knew

                release.set()
                measured = await asyncio.to_thread(
                    wait_for,
                    "the measured throughput to be announced",
                    lambda: announced(throughput=first.throughput_tps),
                    WAIT_S,
                )
                assert measured.throughput_tps > 0
                assert measured.announced_at > first.announced_at
            finally:
                release.set()
                node.cancel()
                await asyncio.gather(node, return_exceptions=True)

        asyncio.run(scenario())


async def _greedy(client: ClientPart, chain: LocalChain | RemoteChain) -> list[int]:
    try:
        return await collect_tokens(client, chain, PROMPT, SamplingParams(max_tokens=NEW_TOKENS))
    finally:
        await chain.close()


def test_unchanged_files_are_trusted_and_changed_ones_hashed(
    tiny_llama_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that matched before is trusted while its stat signature holds; a rewrite of the same
    size with its old mtime restored still changes ctime, so it is hashed and refused."""
    monkeypatch.setattr(verified, "SETTLE_S", 0.1)
    store = tmp_path / "store"
    shutil.copytree(tiny_llama_dir, store)
    manifest = Manifest.load(store)
    rel_path = manifest.blocks[2].file
    path = store / rel_path
    expected = manifest.files[rel_path]

    signature = wait_for("the copied file to settle", lambda: settled_signature(path), 10.0, every_s=0.05)
    assert not already_verified(store, rel_path, expected, signature)  # a copy is hashed once
    verify_file(store, manifest, rel_path, trust_unchanged=True)
    assert already_verified(store, rel_path, expected, signature)

    old = path.stat()
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # same size, same mtime: only ctime tells
    wait_for("the tampered file to settle", lambda: settled_signature(path), 10.0, every_s=0.05)
    with pytest.raises(ModelIntegrityError, match="is corrupt"):
        verify_file(store, manifest, rel_path, trust_unchanged=True)
