"""`COOP_CHEAT=KIND COOP_MINTED_NODES=N python -m tests.adversarial.minted_nodes node start --node-id NAME …`:
one member's N cheating node ids, served by one process.

A member running modified code need not pay a process per node id it mints: here `coop node start`
creates N real `Node`s, NAME-0 … NAME-{N-1}, each with its own gRPC port, control socket and signed
announcement, all computing wrong as `cheating_node` does. They share the process's one DHT peer (the
first node's: a DHT process is forked before any thread starts) and each prints its own ready line.
A signal drains every node of the process, a second one stops them all, as for one node.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any, ClassVar

from coop.config import NodeSettings
from coop.node import daemon
from coop.node.drain import ServingState
from coop.node.throughput import Measure
from coop.swarm.announcement import DRAINING
from coop.swarm.directory import SwarmDirectory
from tests.adversarial.cheating_node import tamper_with_the_node


class SharedDirectory(SwarmDirectory):
    """What every node of the process gets for its DHT peer: the one launched first, stopped once every
    node that got it has stopped it."""

    shared: ClassVar[SharedDirectory | None] = None
    users: ClassVar[int] = 0

    @classmethod
    def launch(cls, *args: Any, **kwargs: Any) -> SharedDirectory:
        if cls.shared is None:
            launched = super().launch(*args, **kwargs)
            assert isinstance(launched, SharedDirectory)
            cls.shared = launched
        cls.users += 1
        return cls.shared

    def shutdown(self) -> None:
        SharedDirectory.users -= 1
        if SharedDirectory.users <= 0:
            super().shutdown()


_nodes: list[tuple[ServingState, asyncio.Event]] = []  # each node's serving state and its stop event


def drain_every_node_on_signal(serving: ServingState) -> asyncio.Event:
    """`daemon._drain_on_signal` for a process of many nodes: one handler drains them all, then stops them all."""
    stop = asyncio.Event()
    _nodes.append((serving, stop))

    def signalled() -> None:
        for node_serving, node_stop in _nodes:
            if node_serving.state == DRAINING:
                node_stop.set()
            else:
                node_serving.drain()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled)
    return stop


async def run_minted_nodes(settings: NodeSettings, measure: Measure | None = None) -> None:
    """`daemon.run_node` for COOP_MINTED_NODES node ids, created one after another (the first forks the DHT peer)."""
    nodes: list[daemon.Node] = []
    try:
        for i in range(int(os.environ["COOP_MINTED_NODES"])):
            minted = settings.model_copy(update={"node_id": f"{settings.node_id}-{i}"})
            nodes.append(await daemon.Node.create(minted, measure))
    except BaseException:
        for node in nodes:
            await node.stack.aclose()
        raise
    await asyncio.gather(*(node.run() for node in nodes))


if __name__ == "__main__":
    from coop.cli import app

    tamper_with_the_node()
    daemon.SwarmDirectory = SharedDirectory  # type: ignore[misc]
    daemon._drain_on_signal = drain_every_node_on_signal
    daemon.run_node = run_minted_nodes
    app(prog_name="coop")
