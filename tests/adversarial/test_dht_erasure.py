"""Attack 1: an outsider erases the directory and hides revocations through the DHT.

The attacker needs no certificate: a bare hivemind peer (no validators) joins through the pool's
bootstrap address and stores plain values expiring in ten years under the directory key and the
revocation key, plus forged tombstones for an honest node. Without record validators that erases
every node of the model, blocks every re-announcement and hides the revocation list.

Pool "victim" (the tiny chat model): Uni A serves 0:2, Uni B and Uni C serve 2:4, the coordinator belongs to Coord
Inst. Uni C is revoked before the attack. Afterwards the honest pool must work as before, the
revocation must hold, and it must still hold in processes started after the DHT copy was lost.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from hivemind import DHT
from hivemind.utils import get_dht_time

from coop.launcher import LocalPool
from coop.model.manifest import Manifest
from coop.pool.bundle import Credentials, MemberBundle
from coop.pool.membership import Membership
from coop.pool.revocation import RevocationList, saved_revocations_path
from coop.swarm.announcement import AnnouncementVerifier, NodeAnnouncement
from coop.swarm.directory import SwarmDirectory, directory_key
from coop.swarm.node_key import NodeKey
from coop.swarm.revocations import revocations_key
from coop.swarm.validation import pool_record_validator
from coop.wire.channels import GRPC_OPTIONS
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from tests.chat_requests import greedy_chat
from tests.pools import make_pool
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
MAX_TOKENS = 8
TEN_YEARS_S = 10 * 365 * 24 * 3600.0
REVOCATION_WAIT_S = 60.0  # generous: lists are polled every 10 s, and the 2-core CI machine is busy
SPANS = {"node-a": "0:2", "node-b": "2:4", "node-c": "2:4"}
INSTITUTIONS = {"node-a": "Uni A", "node-b": "Uni B", "node-c": "Uni C"}


@dataclass
class Victim:
    pool: LocalPool
    pool_dir: Path
    bundles: dict[str, Path]
    key: str
    model_hash: str
    rogue: DHT
    attacked_at: float

    @property
    def pool_id(self) -> str:
        return MemberBundle.load(self.bundles["Uni A"]).pool_id

    def reader(self) -> SwarmDirectory:
        """A DHT peer of the pool as the SDK runs one: it believes only what the pool signed."""
        membership = Membership.load(self.bundles["Client Inst"])
        return SwarmDirectory.start([self.pool.peer], validator=pool_record_validator(membership))

    def verifier(self) -> AnnouncementVerifier:
        bundle = MemberBundle.load(self.bundles["Client Inst"])
        return AnnouncementVerifier(bundle.ca_cert_pem, bundle.pool_id)


def _revoke(pool_dir: Path, institution: str, peer: str) -> None:
    args = ["member", "revoke", institution, "--pool", str(pool_dir), "--initial-peers", peer]
    done = subprocess.run([sys.executable, "-m", "coop.cli", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _saved_names(bundle: Path) -> frozenset[str]:
    """Who the list a process kept next to bundle revokes (nothing before it kept one)."""
    saved = saved_revocations_path(bundle)
    if not saved.exists():
        return frozenset()
    return frozenset(RevocationList.load(saved, MemberBundle.load(bundle).ca_cert_pem).revoked)


def _attack(peer: str, pool_id: str, model_hash: str) -> DHT:
    """A bare hivemind peer joins through the bootstrap address and writes what it likes."""
    rogue = DHT(initial_peers=[peer], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    far = get_dht_time() + TEN_YEARS_S
    key = directory_key(pool_id, model_hash)
    rogue.store(key, subkey=str(NodeKey("Uni A", "node-a")), value=None, expiration_time=far)  # tombstone, old style
    forged = {"withdrawn": True, "node_id": "node-b", "pool_id": pool_id, "model_hash": model_hash}
    rogue.store(key, subkey=str(NodeKey("Uni B", "node-b")), value=forged, expiration_time=far)  # tombstone, unsigned
    rogue.store(key, value="erased", expiration_time=far + 1)
    rogue.store(revocations_key(pool_id), value=b"nothing revoked", expiration_time=far)
    return rogue


@pytest.fixture(scope="module")
def victim(tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Victim]:
    pool_dir = tmp_path_factory.mktemp("erasure") / "victim"
    members = (*INSTITUTIONS.values(), "Client Inst")
    disk = make_pool(pool_dir, "Victim pool", members, coordinators=("Coord Inst",), api_keys=("Client Inst",))
    bundles, key = disk.bundles, disk.keys["Client Inst"]
    pool = LocalPool(tiny_chat_model_dir)
    rogue: DHT | None = None
    try:
        pool.start_dht(member=bundles["Uni A"])
        pool.start_nodes(SPANS, {name: bundles[inst] for name, inst in INSTITUTIONS.items()})
        pool.start_coordinator(member=bundles["Coord Inst"], api_keys=pool_dir / "api_keys.json")

        _revoke(pool_dir, "Uni C", pool.peer)  # before the attack
        holders = [bundles["Coord Inst"], bundles["Uni A"]]
        wait_for(
            "the coordinator and node-a to keep the revocation on disk",
            lambda: all("Uni C" in _saved_names(bundle) for bundle in holders),
            REVOCATION_WAIT_S,
        )

        model_hash = Manifest.load(tiny_chat_model_dir).content_hash
        pool_id = MemberBundle.load(bundles["Uni A"]).pool_id
        attacked_at = time.time()
        rogue = _attack(pool.peer, pool_id, model_hash)
        yield Victim(pool, pool_dir, bundles, key, model_hash, rogue, attacked_at)
    finally:
        if rogue is not None:
            rogue.shutdown()
        pool.stop()


def _chat(url: str, key: str) -> httpx.Response:
    return greedy_chat(url, key, QUESTION, MAX_TOKENS)


def _answer(url: str, key: str) -> tuple[list[int], list[str]] | None:
    """(token ids, route) of one greedy chat; None if no route covers the model (503)."""
    response = _chat(url, key)
    if response.status_code == 503:
        return None
    assert response.status_code == 200, response.text
    coop = response.json()["coop"]
    return coop["token_ids"], [hop["node_id"] for hop in coop["route"]]


def test_honest_nodes_stay_listed_and_keep_re_announcing(victim: Victim) -> None:
    with victim.reader() as reader:

        def listed() -> list[NodeAnnouncement]:
            return reader.list_nodes(victim.pool_id, victim.model_hash, victim.verifier())

        assert {n.node_id for n in listed()} == set(SPANS)

        def all_re_announced() -> bool:
            nodes = listed()
            return {n.node_id for n in nodes} == set(SPANS) and all(n.announced_at > victim.attacked_at for n in nodes)

        wait_for("every node to re-announce after the attack", all_re_announced, REVOCATION_WAIT_S)


def test_the_coordinator_still_answers_like_one_process(
    victim: Victim, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    for _ in range(3):
        assert _answer(victim.pool.url, victim.key) == (
            tiny_reference(QUESTION, MAX_TOKENS),
            ["node-a", "node-b"],  # Uni C, revoked before the attack, stays out
        )


def test_the_revocation_list_stays_readable_and_the_admin_can_republish(victim: Victim) -> None:
    ca = MemberBundle.load(victim.bundles["Uni A"]).ca_cert_pem

    def newest_in_dht() -> RevocationList:
        with victim.reader() as reader:
            lists = [RevocationList.from_bytes(blob) for blob in reader.fetch_blobs(revocations_key(victim.pool_id))]
        for revocations in lists:
            revocations.verify(ca)
        return max(lists, key=lambda revocations: revocations.issued_at)

    before = newest_in_dht()
    assert "Uni C" in before.revoked
    _revoke(victim.pool_dir, "Uni C", victim.pool.peer)  # re-signs and publishes a newer version
    published = RevocationList.load(victim.pool_dir / "revocations.json", ca)
    assert published.issued_at > before.issued_at
    assert newest_in_dht() == published


def _info_as(endpoint: str, caller: Credentials, node: tuple[str, str]) -> grpc.StatusCode:
    """Info from `node` (institution, node id) at endpoint, asked by `caller`."""
    options = [*GRPC_OPTIONS, ("grpc.ssl_target_name_override", caller.node_tls_name(*node))]
    with grpc.secure_channel(endpoint, caller.channel_credentials(), options=options) as channel:
        try:
            coop_pb2_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


def test_a_revoked_member_stays_revoked_after_the_dht_copy_is_lost(
    victim: Victim, tiny_chat_model_dir: str, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    """The whole swarm goes; the same members start a new one, where nobody ever published the list."""
    victim.rogue.shutdown()
    victim.pool.stop()
    fresh = LocalPool(tiny_chat_model_dir)
    try:
        fresh.start_dht(member=victim.bundles["Uni B"])
        spans = {"node-a": SPANS["node-a"], "node-c": SPANS["node-c"]}
        fresh.start_nodes(spans, {name: victim.bundles[INSTITUTIONS[name]] for name in spans})
        fresh.start_coordinator(member=victim.bundles["Coord Inst"], api_keys=victim.pool_dir / "api_keys.json")

        # The only node for 2:4 is the revoked member's: the coordinator knows it from disk.
        assert _answer(fresh.url, victim.key) is None
        uni_c = MemberBundle.load(victim.bundles["Uni C"]).credentials("node-c")
        node_a = fresh.nodes["node-a"].ready
        where, who = node_a["endpoint"], (node_a["institution"], node_a["node_id"])
        assert _info_as(where, uni_c, who) == grpc.StatusCode.PERMISSION_DENIED
        coordinator = MemberBundle.load(victim.bundles["Coord Inst"]).credentials()
        assert _info_as(where, coordinator, who) == grpc.StatusCode.OK

        fresh.start_nodes({"node-b": SPANS["node-b"]}, {"node-b": victim.bundles["Uni B"]})
        answer = wait_for("a route through node-b", lambda: _answer(fresh.url, victim.key), REVOCATION_WAIT_S)
        assert answer == (tiny_reference(QUESTION, MAX_TOKENS), ["node-a", "node-b"])
    finally:
        fresh.stop()
