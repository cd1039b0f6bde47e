"""Attack 2: a member squats another member's node id in the directory.

Node ids are unique only within an institution, and a member's certificate mints node certificates
for any id. Mallory, a member in good standing, names a node of hers like Uni A's "uni-a-1" and
signs, with her valid bundle, a withdrawal and a 120 s record for it. Were the directory keyed by
node id alone, her tombstone would hide Uni A's node and refuse its re-announcements as older, and
every chat would get 503. Her records must land under her own identity (Mallory, "uni-a-1") only:
stored straight into the DHT under Uni A's subkey, pool peers refuse them.

Pool "squat" (the tiny chat model): Uni A's "uni-a-1" serves every block; the coordinator is Coord's;
Client pays. Mallory's record announces her node as draining, so no route is offered through an
endpoint she does not serve (what a coordinator does with a failing same-named node is its own
suspicion logic, not the directory's).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hivemind import DHT

from coop.launcher import LocalPool
from coop.model.manifest import Manifest
from coop.pool.bundle import MemberBundle
from coop.pool.membership import Membership
from coop.pool.registry import add_member, create_api_key, create_pool
from coop.swarm.announcement import DRAINING, AnnouncementVerifier, stamp_announcement, stamp_withdrawal
from coop.swarm.directory import MAX_RECORD_TTL_S, SwarmDirectory, directory_key
from coop.swarm.node_key import NodeKey
from coop.swarm.validation import pool_record_validator
from tests.chat_requests import answered_chat
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

VICTIM = ("Uni A", "uni-a-1")
QUESTION = "What is the capital of France?"
MAX_TOKENS = 6
WAIT_S = 60.0


@dataclass
class Squat:
    pool: LocalPool
    bundles: dict[str, Path]
    key: str
    manifest: Manifest
    attacked_at: float

    @property
    def pool_id(self) -> str:
        return MemberBundle.load(self.bundles["Uni A"]).pool_id

    def listed(self) -> list[tuple[str, str, float]]:
        """(institution, node id, announced at) of every node a pool reader believes."""
        client = MemberBundle.load(self.bundles["Client"])
        membership = Membership.load(self.bundles["Client"])
        with SwarmDirectory.start([self.pool.peer], validator=pool_record_validator(membership)) as reader:
            verifier = AnnouncementVerifier(client.ca_cert_pem, client.pool_id)
            nodes = reader.list_nodes(client.pool_id, self.manifest.content_hash, verifier)
        return [(n.institution, n.node_id, n.announced_at) for n in nodes]


def _squat(peer: str, bundle_path: Path, manifest: Manifest) -> None:
    """Mallory's records for her "uni-a-1": through the directory as a node stores them, and straight
    into the DHT under Uni A's subkey."""
    mallory = MemberBundle.load(bundle_path)
    signer = mallory.credentials(VICTIM[1])
    fields = {
        "node_id": VICTIM[1],
        "pool_id": mallory.pool_id,
        "model_hash": manifest.content_hash,
        "start": 0,
        "end": manifest.num_blocks,
        "endpoint": "127.0.0.1:9",
        "institution": "Mallory",
        "throughput_tps": 1e6,
        "free_cache_bytes": 1 << 30,
        "state": DRAINING,
    }
    now = time.time()
    record = stamp_announcement(fields, now=now, ttl_s=MAX_RECORD_TTL_S, bundle=signer)
    tombstone = stamp_withdrawal(record, now=now, expires_at=now + MAX_RECORD_TTL_S, bundle=signer)
    validator = pool_record_validator(Membership.load(bundle_path))
    with SwarmDirectory.start([peer], validator=validator) as directory:
        assert directory.announce(record)
        directory.withdraw(record, signer)  # her own tombstone, for her own node
    rogue = DHT(initial_peers=[peer], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        key, victim_subkey = directory_key(mallory.pool_id, manifest.content_hash), str(NodeKey(*VICTIM))
        for value in (tombstone.to_wire(), record.to_wire()):
            rogue.store(key, subkey=victim_subkey, value=value, expiration_time=now + MAX_RECORD_TTL_S)
            rogue.store(key, subkey=VICTIM[1], value=value, expiration_time=now + MAX_RECORD_TTL_S)  # the old subkey
    finally:
        rogue.shutdown()


@pytest.fixture(scope="module")
def squat(tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Squat]:
    pool_dir = tmp_path_factory.mktemp("squat") / "pool"
    create_pool(pool_dir, "Squat pool")
    bundles = {name: add_member(pool_dir, name) for name in ("Uni A", "Mallory", "Client")}
    bundles["Coord"] = add_member(pool_dir, "Coord", role="coordinator")
    key = create_api_key(pool_dir, "Client")
    manifest = Manifest.load(tiny_chat_model_dir)
    pool = LocalPool(tiny_chat_model_dir)
    try:
        pool.start_dht(member=bundles["Uni A"])
        pool.start_nodes({VICTIM[1]: f"0:{manifest.num_blocks}"}, {VICTIM[1]: bundles["Uni A"]})
        pool.start_coordinator(member=bundles["Coord"], api_keys=pool_dir / "api_keys.json")
        attacked_at = time.time()
        _squat(pool.peer, bundles["Mallory"], manifest)
        yield Squat(pool, bundles, key, manifest, attacked_at)
    finally:
        pool.stop()


def test_the_victim_stays_listed_and_keeps_re_announcing(squat: Squat) -> None:
    def re_announced() -> bool:
        return any((inst, node) == VICTIM and at > squat.attacked_at + 1 for inst, node, at in squat.listed())

    wait_for("Uni A's node to re-announce after the squat", re_announced, WAIT_S)
    assert {(inst, node) for inst, node, _ in squat.listed()} <= {VICTIM, ("Mallory", VICTIM[1])}


def test_chats_are_answered_through_the_victims_node(
    squat: Squat, tiny_reference: Callable[[str, int], list[int]]
) -> None:
    for _ in range(3):
        answer = answered_chat(squat.pool.url, squat.key, QUESTION, MAX_TOKENS)
        assert answer["coop"]["token_ids"] == tiny_reference(QUESTION, MAX_TOKENS)
        assert [(hop["institution"], hop["node_id"]) for hop in answer["coop"]["route"]] == [VICTIM]
