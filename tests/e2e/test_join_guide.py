"""docs/join.md, run as written: its marked bash blocks, in order, against a real pool.

The pool has a DHT peer, a node of Uni B serving half the model and a coordinator with a SQLite
ledger. Uni A joins by the guide: the test sets only the variables the guide's first block declares,
then runs every `run` block to success and the `serve` block until the node is ready. The joined
node must then be credited in the ledger for the request the guide sends.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coop.launcher import CoopProcess, LocalPool, start
from coop.ledger.database import sqlite_url
from coop.ledger.store import Ledger
from coop.model.manifest import Manifest
from tests.conftest import REPO_ROOT
from tests.http_servers import free_port
from tests.pools import make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow
GUIDE = Path(REPO_ROOT) / "docs" / "join.md"
BLOCK = re.compile(r"<!-- join-guide: (\w+) -->\n```bash\n(.*?)```", re.DOTALL)
BLOCK_TIMEOUT_S = 300
BOOKING_WAIT_S = 60.0


@dataclass
class JoinPool:
    pool: LocalPool
    pool_dir: Path
    joiner_bundle: Path
    api_key: str


def guide_blocks() -> list[tuple[str, str]]:
    """(kind, script) of every marked block of the guide, in order."""
    return BLOCK.findall(GUIDE.read_text())


@pytest.fixture(scope="module")
def join_pool(tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JoinPool]:
    pool_dir = tmp_path_factory.mktemp("join") / "pool"
    disk = make_pool(pool_dir, "Join pool", ("Uni A", "Uni B"), coordinators=("Coord",), api_keys=("Uni A",))
    joiner, existing, api_key = disk.bundles["Uni A"], disk.bundles["Uni B"], disk.keys["Uni A"]
    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht(member=existing)
        pool.start_nodes({"node-b": "0:2"}, {"node-b": existing})
        disk.start_coordinator(pool, "Coord", ["--receipt-interval-s", "0.3"])
        yield JoinPool(pool, pool_dir, joiner, api_key)
    finally:
        pool.stop()


def test_the_join_guide_brings_a_serving_node_that_earns_credits(join_pool: JoinPool, tmp_path: Path) -> None:
    blocks = guide_blocks()
    kinds = [kind for kind, _ in blocks]
    assert kinds[0] == "placeholders" and kinds.count("serve") == 1 and set(kinds) == {"placeholders", "run", "serve"}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "coop").write_text(f'#!/bin/sh\nexec {sys.executable} -m coop.cli "$@"\n')
    (bin_dir / "coop").chmod(0o755)
    model_dir = Path(join_pool.pool.model_dir)
    values = {
        "BUNDLE": str(join_pool.joiner_bundle),
        "PEERS": join_pool.pool.peer,
        "MODEL_SOURCE": str(model_dir.parent / "hf"),  # the source the pool's model was prepared from
        "MODEL_DIR": str(tmp_path / "model"),
        "NODE_ID": "uni-a-1",
        "LISTEN_HOST": "127.0.0.1",
        "PUBLIC_HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "COORDINATOR_URL": join_pool.pool.url,
        "API_KEY": join_pool.api_key,
    }
    declared = re.findall(r"^export (\w+)=", blocks[0][1], re.MULTILINE)
    assert sorted(declared) == sorted(values), "the test sets exactly the variables the guide declares"
    # HF_HUB_OFFLINE as everywhere here: transformers writes it into tokenizer_config.json (so into the hash)
    env = {**values, "PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": REPO_ROOT, "HF_HUB_OFFLINE": "1"}
    node: CoopProcess | None = None
    try:
        for kind, script in blocks[1:]:
            if kind == "serve":
                node = start(
                    "joined node", ["-euo", "pipefail", "-c", script], "COOP_NODE_READY", program=["bash"], env=env
                )
                continue
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
                check=False,
            )
            assert done.returncode == 0, f"guide block failed:\n{script}\n{done.stdout}\n{done.stderr}"
            if script.startswith("coop node doctor"):
                assert "OK   dial-back" in done.stdout, done.stdout
            if script.startswith("coop status"):
                assert "uni-a-1" in done.stdout, done.stdout
        assert node is not None and node.alive
        assert Manifest.load(values["MODEL_DIR"]).content_hash == Manifest.load(model_dir).content_hash
        ledger = Ledger.open(sqlite_url(join_pool.pool_dir / "ledger.db"))

        def credited() -> int:
            balance = ledger.balance("Uni A")
            return balance.contributed_flops if balance is not None else 0

        assert wait_for("Uni A to be credited for its node's work", credited, BOOKING_WAIT_S) > 0
    finally:
        if node is not None:
            node.stop()
