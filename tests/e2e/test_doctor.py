"""`coop node doctor` against a real pool: a DHT peer and a node of Uni B, real doctor processes.

A healthy member gets OK on every line; each broken case gets a FAIL naming the cause, with its fix.
The dial-back is made by Uni B's node (the DialBack RPC), so the endpoint is checked from a peer.
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from coop.launcher import COOP, LocalPool
from coop.node.dial_back import UNREACHABLE
from coop.pool import ca
from coop.pool.registry import add_member
from tests.http_servers import free_port
from tests.pools import certificates_backdated, make_pool

pytestmark = pytest.mark.slow
DOCTOR_TIMEOUT_S = 300
CHECKS = ("bundle", "model", "memory", "port", "dht", "revocation", "dial-back", "clock")


@dataclass
class DoctorPool:
    pool: LocalPool
    pool_dir: Path
    bundles: dict[str, Path]


@pytest.fixture(scope="module")
def doctor_pool(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoctorPool]:
    pool_dir = tmp_path_factory.mktemp("doctor") / "pool"
    bundles = make_pool(pool_dir, "Doctor pool", ("Uni A", "Uni B", "Uni R")).bundles
    expired_a_month_ago = mock.patch.object(ca, "MEMBER_VALIDITY", dt.timedelta(days=-30))
    with certificates_backdated(dt.timedelta(days=400)), expired_a_month_ago:
        bundles["Uni E"] = add_member(pool_dir, "Uni E")
    pool = LocalPool(tiny_llama_dir)
    try:
        pool.start_dht(member=bundles["Uni B"])
        pool.start_nodes({"node-b": "0:6"}, {"node-b": bundles["Uni B"]})
        yield DoctorPool(pool, pool_dir, bundles)
    finally:
        pool.stop()


def doctor(pool: DoctorPool, institution: str, *args: str, model: str = "") -> tuple[int, dict[str, str]]:
    """Exit status and {check: its line and fix line} of `coop node doctor` for institution's bundle."""
    command = [*COOP, "node", "doctor", "--member", str(pool.bundles[institution]), "--device", "cpu"]
    command += ["--model", model or pool.pool.model_dir, "--initial-peers", pool.pool.peer, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=DOCTOR_TIMEOUT_S, check=False)
    lines = done.stdout.splitlines()
    report = {}
    for i, line in enumerate(lines):
        status, _, rest = line.partition(" ")
        if status in ("OK", "WARN", "FAIL"):
            name = rest.split()[0]
            fix = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].strip().startswith("fix:") else ""
            report[name] = f"{status} {rest.strip()} {fix}".strip()
    assert set(report) == set(CHECKS), done.stdout + done.stderr
    return done.returncode, report


def test_a_healthy_member_passes_every_check(doctor_pool: DoctorPool) -> None:
    status, report = doctor(doctor_pool, "Uni A", "--port", str(free_port()))
    assert status == 0, report
    assert all(line.startswith("OK") for line in report.values()), report
    assert "node node-b of 'Uni B' reached this node at 127.0.0.1:" in report["dial-back"]


def test_an_expired_certificate_is_reported_with_its_fix(doctor_pool: DoctorPool) -> None:
    status, report = doctor(doctor_pool, "Uni E", "--port", str(free_port()))
    assert status == 1
    assert report["bundle"].startswith("FAIL") and "expired on" in report["bundle"]
    assert "fix: ask the pool operator for a new member bundle" in report["bundle"]


def test_a_tampered_block_and_a_busy_port_are_reported_with_their_fixes(
    doctor_pool: DoctorPool, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(doctor_pool.pool.model_dir, model)
    block = model / "blocks" / "0003.safetensors"
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF
    block.write_bytes(bytes(data))
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        status, report = doctor(doctor_pool, "Uni A", "--port", str(port), model=str(model))
    assert status == 1
    assert report["model"].startswith("FAIL") and "0003.safetensors is corrupt" in report["model"]
    assert "fix: prepare it again (coop model prepare" in report["model"]
    assert report["port"].startswith(f"FAIL port       cannot listen on 127.0.0.1:{port}")
    assert f"fix: stop whatever listens there (`ss -ltnp 'sport = :{port}'`" in report["port"]
    assert report["bundle"].startswith("OK")


def test_a_revoked_member_is_reported_with_its_fix(doctor_pool: DoctorPool) -> None:
    revoke = ["member", "revoke", "Uni R", "--pool", str(doctor_pool.pool_dir), "--initial-peers"]
    subprocess.run([*COOP, *revoke, doctor_pool.pool.peer], check=True, capture_output=True, timeout=120)
    status, report = doctor(doctor_pool, "Uni R", "--port", str(free_port()))
    assert status == 1
    assert report["revocation"].startswith("FAIL") and "'Uni R' is revoked" in report["revocation"]
    assert "fix: a revoked member cannot serve" in report["revocation"]


def test_an_endpoint_no_peer_can_reach_is_reported_with_its_fix(doctor_pool: DoctorPool) -> None:
    # the node listens on 127.0.0.1 but would announce 127.0.0.2, where nothing listens
    status, report = doctor(doctor_pool, "Uni A", "--port", str(free_port()), "--announce-host", "127.0.0.2")
    assert status == 1
    assert report["dial-back"].startswith("FAIL") and "could not reach 127.0.0.2:" in report["dial-back"]
    assert UNREACHABLE in report["dial-back"] and "fix: make 127.0.0.2:" in report["dial-back"]
    assert report["clock"].startswith("OK")
