"""Membership and security with real processes: mutual TLS, signed records, API keys, revocation.

Pool "victim": Uni A serves 0:15, Uni B and Uni C both serve 15:30, the coordinator belongs to
Coord Inst, requests are paid by Client Inst. An intruder without a certificate announces itself
under the pool's DHT key, claiming the whole model at high speed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from coop.launcher import CoopProcess, LocalPool, start
from coop.pool.bundle import MemberBundle
from coop.wire.channels import GRPC_OPTIONS
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from tests.pools import make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow
REVOCATION_WAIT_S = 60.0  # generous: the 2-core CI machine runs other tests' processes too


@dataclass
class SecurePool:
    pool: LocalPool
    pool_dir: Path
    bundles: dict[str, Path]
    keys: dict[str, str]
    intruder: CoopProcess
    evil_bundle: Path


@pytest.fixture(scope="module")
def secure(demo_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecurePool]:
    root = tmp_path_factory.mktemp("security")
    pool_dir = root / "victim"
    members = ("Uni A", "Uni B", "Uni C", "Client Inst")
    disk = make_pool(pool_dir, "Victim pool", members, coordinators=("Coord Inst",), api_keys=("Client Inst", "Uni B"))
    bundles, keys = disk.bundles, disk.keys
    evil_bundle = make_pool(root / "evil", "Evil pool", ("Mallory",)).bundles["Mallory"]
    pool = LocalPool(demo_model_dir)
    intruder = None
    try:
        pool.start_dht()
        pool.start_nodes(
            {"node-a": "0:15", "node-b": "15:30", "node-c": "15:30"},
            {"node-a": bundles["Uni A"], "node-b": bundles["Uni B"], "node-c": bundles["Uni C"]},
        )
        os.environ["COOP_NODE_POOL_ID"] = MemberBundle.load(bundles["Uni A"]).pool_id
        try:  # no certificate, but the victim pool's id: its records land under the pool's key
            args = ["node", "start", "--model", demo_model_dir, "--blocks", "0:30", "--initial-peers", pool.peer]
            intruder = start("intruder", [*args, "--node-id", "intruder", "--device", "cpu"], "COOP_NODE_READY")
        finally:
            del os.environ["COOP_NODE_POOL_ID"]
        pool.processes.append(intruder)
        pool.start_coordinator(member=bundles["Coord Inst"], api_keys=pool_dir / "api_keys.json")
        yield SecurePool(pool, pool_dir, bundles, keys, intruder, evil_bundle)
    finally:
        pool.stop()


def _chat(url: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def _route(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [hop["node_id"] for hop in response.json()["coop"]["route"]]


def test_unsigned_intruder_is_never_routed(secure: SecurePool) -> None:
    assert secure.intruder.ready["pool_id"] == MemberBundle.load(secure.bundles["Uni A"]).pool_id
    for _ in range(3):
        route = _route(_chat(secure.pool.url, secure.keys["Client Inst"]))
        assert "intruder" not in route and route[0] == "node-a"


def test_api_keys_are_required(secure: SecurePool) -> None:
    assert _chat(secure.pool.url, None).status_code == 401
    assert _chat(secure.pool.url, "coop_forged").status_code == 401


def _info(endpoint: str, credentials: grpc.ChannelCredentials | None, name: str = "") -> grpc.StatusCode:
    options = [*GRPC_OPTIONS, ("grpc.ssl_target_name_override", name)] if name else GRPC_OPTIONS
    channel = (
        grpc.secure_channel(endpoint, credentials, options=options)
        if credentials
        else grpc.insecure_channel(endpoint, options=options)
    )
    with channel:
        try:
            coop_pb2_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


def test_nodes_refuse_callers_without_a_pool_certificate(secure: SecurePool) -> None:
    endpoint = secure.pool.nodes["node-a"].ready["endpoint"]
    coordinator = MemberBundle.load(secure.bundles["Coord Inst"]).credentials()
    name = coordinator.node_tls_name("Uni A", "node-a")
    evil = MemberBundle.load(secure.evil_bundle).credentials("node-x")
    assert _info(endpoint, coordinator.channel_credentials(), name) == grpc.StatusCode.OK
    assert _info(endpoint, None) == grpc.StatusCode.UNAVAILABLE
    evil_creds = grpc.ssl_channel_credentials(coordinator.ca_cert_pem, evil.key_pem, evil.chain_pem)
    assert _info(endpoint, evil_creds, name) == grpc.StatusCode.UNAVAILABLE
    # The node must be the one announced at that endpoint: node-b's name does not answer there.
    wrong = coordinator.node_tls_name("Uni B", "node-b")
    assert _info(endpoint, coordinator.channel_credentials(), wrong) == grpc.StatusCode.UNAVAILABLE


def test_revoked_member_leaves_routes_and_loses_its_keys(secure: SecurePool) -> None:
    url = secure.pool.url
    assert _chat(url, secure.keys["Uni B"]).status_code == 200
    revoke = subprocess.run(
        [
            sys.executable,
            "-m",
            "coop.cli",
            "member",
            "revoke",
            "Uni B",
            "--pool",
            str(secure.pool_dir),
            "--initial-peers",
            secure.pool.peer,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert revoke.returncode == 0, revoke.stderr
    revoked_at = time.monotonic()
    assert _chat(url, secure.keys["Uni B"]).status_code == 401  # keys: at once

    def route_without_node_b() -> list[str] | None:
        route = _route(_chat(url, secure.keys["Client Inst"]))  # other members never see an error
        return route if "node-b" not in route else None

    route = wait_for("the revoked member's node to leave routes", route_without_node_b, REVOCATION_WAIT_S)
    took = time.monotonic() - revoked_at
    print(f"revoked member's node left routes after {took:.1f}s")
    assert route == ["node-a", "node-c"]
    for _ in range(3):
        assert "node-b" not in _route(_chat(url, secure.keys["Client Inst"]))


def test_no_secrets_in_logs(secure: SecurePool) -> None:
    secrets = list(secure.keys.values())
    for bundle_path in secure.bundles.values():
        key_pem = MemberBundle.load(bundle_path).key_pem.decode()
        secrets += [line for line in key_pem.splitlines() if line and "-----" not in line]
    secrets.append((secure.pool_dir / "admin.token").read_text().strip())
    logs = "\n".join(line for process in secure.pool.processes for line in process.lines)
    assert logs  # the processes did log
    leaked = [secret[:12] for secret in secrets if secret in logs]
    assert not leaked
