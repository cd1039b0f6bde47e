"""Start a local pool as real processes: a DHT peer, nodes, a coordinator (`coop demo`, e2e tests).

Each process is started through the `coop` entry point, waited for by its readiness line on
stdout (never a sleep), stopped with SIGTERM (its own graceful shutdown), and its whole process
group is killed if it lingers, so the DHT helpers it forked never outlive it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COOP = [sys.executable, "-m", "coop.cli"]
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0


@dataclass
class CoopProcess:
    name: str
    popen: subprocess.Popen[str]
    ready: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def _pump(self) -> None:
        if self.popen.stdout is None:
            return
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)
        self._queue.put(None)

    def wait_ready(self, marker: str, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"{self.name} exited before it was ready:\n" + "\n".join(self.lines[-30:]))
            if line.startswith(marker + " "):
                self.ready = json.loads(line.split(" ", 1)[1])
                return self.ready
        raise TimeoutError(f"{self.name} not ready after {timeout_s}s:\n" + "\n".join(self.lines[-30:]))

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill_hard(self) -> None:
        """kill -9 of the node process alone, as a crash would."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):  # the DHT helpers it forked, whatever happened to it
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


def start(
    name: str,
    args: list[str],
    marker: str | None,
    *,
    program: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> CoopProcess:
    """Spawn `coop ARGS` (or `program ARGS`, with `env` added); wait for its readiness line unless marker is None.

    `COOP` is looked up at each call, so that tests can run a modified node in its place."""
    env = {**os.environ, **(env or {}), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    popen = subprocess.Popen(
        [*(program or COOP), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    process = CoopProcess(name, popen)
    threading.Thread(target=process._pump, name=f"pump-{name}", daemon=True).start()
    if marker is not None:
        try:
            process.wait_ready(marker)
        except BaseException:
            process.stop()
            raise
    return process


class LocalPool:
    """A DHT bootstrap peer, nodes and a coordinator on 127.0.0.1."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self.processes: list[CoopProcess] = []
        self.nodes: dict[str, CoopProcess] = {}
        self.peer = ""
        self.url = ""

    def start_dht(self, member: Path | None = None) -> None:
        """`member`: the bundle of the member running the bootstrap peer (it then holds only pool records)."""
        dht = start("dht", ["dht", "start", *(["--member", str(member)] if member else [])], "COOP_DHT_READY")
        self.processes.append(dht)
        self.peer = dht.ready["dht_maddrs"][0]

    def start_nodes(
        self,
        spans: dict[str, str],
        members: dict[str, Path] | None = None,
        extra_args: Sequence[str] = (),
        model_dir: str | None = None,
    ) -> None:
        """Start nodes {name: "A:B"} side by side, then wait until every one is serving.

        `members` gives a node its institution's member bundle (mutual TLS, signed records);
        `model_dir`: the model they serve (default: the pool's).
        """
        for name, blocks in spans.items():
            model = model_dir or self.model_dir
            args = ["node", "start", "--model", model, "--blocks", blocks, "--initial-peers", self.peer]
            if members and name in members:
                args += ["--member", str(members[name])]
            node = start(name, [*args, "--node-id", name, "--device", "cpu", *extra_args], None)
            self.processes.append(node)
            self.nodes[name] = node
        for name in spans:
            self.nodes[name].wait_ready("COOP_NODE_READY")

    def start_coordinator(
        self,
        port: int = 0,
        member: Path | None = None,
        api_keys: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> CoopProcess:
        """`extra_args`: more `coop coordinator start` flags, e.g. ["--pool-dir", DIR]."""
        args = ["coordinator", "start", "--model", self.model_dir, "--port", str(port), "--initial-peers", self.peer]
        if member is not None:
            args += ["--member", str(member)]
        if api_keys is not None:
            args += ["--api-keys", str(api_keys)]
        coordinator = start("coordinator", [*args, "--device", "cpu", *extra_args], "COOP_COORDINATOR_READY")
        self.processes.append(coordinator)
        self.url = coordinator.ready["url"]
        return coordinator

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
