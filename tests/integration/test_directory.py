"""SwarmDirectory against real hivemind DHT peers on 127.0.0.1 (no mocks, no internet).

One three-peer swarm is shared by the module because starting a peer costs ~0.5 s; every test uses
its own (pool_id, model_hash) so tests cannot see each other's records.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from hivemind import DHT
from hivemind.utils import get_dht_time

from coop.errors import InvalidInput, PeerError
from coop.swarm.announcement import NodeAnnouncement
from coop.swarm.directory import Announcer, SwarmDirectory, directory_key
from tests.waiting import wait_for

Swarm = tuple[SwarmDirectory, SwarmDirectory, SwarmDirectory]
EXPIRY_WAIT_S = 30.0  # generous: a lapsed 1 s record goes at once, but the 2-core CI machine is busy


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    started: list[SwarmDirectory] = []
    try:
        first = SwarmDirectory.start([])
        started.append(first)
        peers = first.visible_maddrs()
        started.append(SwarmDirectory.start(peers))
        started.append(SwarmDirectory.start(peers))
        yield started[0], started[1], started[2]
    finally:
        for directory in started:
            directory.shutdown()


@pytest.fixture
def model() -> tuple[str, str]:
    """A fresh (pool_id, model_hash) per test."""
    return f"pool-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex


def make_ann(
    pool_id: str = "pool",
    model_hash: str = "abc123",
    node_id: str = "node-a",
    start: int = 0,
    end: int = 4,
    ttl_s: float = 30.0,
    **overrides: object,
) -> NodeAnnouncement:
    now = time.time()
    fields: dict[str, object] = dict(
        node_id=node_id,
        pool_id=pool_id,
        model_hash=model_hash,
        start=start,
        end=end,
        endpoint="127.0.0.1:50051",
        institution="Example University",
        throughput_tps=12.5,
        free_cache_bytes=1 << 30,
        announced_at=now,
        expires_at=now + ttl_s,
    )
    fields.update(overrides)
    return NodeAnnouncement.model_validate(fields)


def ids(nodes: list[NodeAnnouncement]) -> list[str]:
    return [node.node_id for node in nodes]


# --- NodeAnnouncement ------------------------------------------------------------------------------


def test_wire_round_trip() -> None:
    ann = make_ann(signature=b"\x01\x02", certificate=b"cert")
    wire = ann.to_wire()
    assert all(isinstance(value, str | int | float | bytes) for value in wire.values())
    assert NodeAnnouncement.from_wire(wire) == ann
    # Unknown keys from a newer peer are tolerated.
    assert NodeAnnouncement.from_wire({**wire, "future_field": [1, 2]}) == ann


@pytest.mark.parametrize(
    "overrides",
    [
        {"start": 4, "end": 4},
        {"start": 5, "end": 4},
        {"start": -1},
        {"endpoint": "localhost"},
        {"endpoint": "localhost:0"},
        {"endpoint": "localhost:70000"},
        {"endpoint": "local host:80"},
        {"endpoint": "[not-ipv6]:80"},
        {"throughput_tps": math.nan},
        {"throughput_tps": -1.0},
        {"free_cache_bytes": -1},
        {"node_id": ""},
        {"pool_id": "a/b"},
        {"institution": ""},
        {"start": "0"},
        {"start": True},
        {"signature": "not bytes"},
    ],
)
def test_invalid_announcements_are_rejected(overrides: dict[str, object]) -> None:
    wire: dict[str, object] = {**make_ann().to_wire(), **overrides}
    with pytest.raises(InvalidInput):
        NodeAnnouncement.from_wire(wire)


def test_valid_endpoints() -> None:
    for endpoint in ["10.0.0.5:1", "node-7.example.org:50051", "[::1]:65535"]:
        assert make_ann(endpoint=endpoint).endpoint == endpoint


def test_expiry_must_follow_announcement() -> None:
    now = time.time()
    with pytest.raises(InvalidInput):
        NodeAnnouncement.from_wire({**make_ann().to_wire(), "announced_at": now, "expires_at": now})


@pytest.mark.parametrize("garbage", [None, 42, "x", b"\x00\xff", [1, 2], {}, {1: 2}, {"node_id": 5}])
def test_from_wire_never_crashes_on_garbage(garbage: object) -> None:
    with pytest.raises(InvalidInput):
        NodeAnnouncement.from_wire(garbage)


def test_key_scheme() -> None:
    assert directory_key("p", "m") == "coop/v1/pools/p/models/m/nodes"
    assert directory_key("p", "m") != directory_key("p", "n")


# --- SwarmDirectory on a real swarm ----------------------------------------------------------------


def test_announce_on_one_peer_list_on_others(swarm: Swarm, model: tuple[str, str]) -> None:
    a, b, c = swarm
    pool_id, model_hash = model
    assert a.announce(make_ann(pool_id, model_hash, "node-a", 0, 4))
    assert b.announce(make_ann(pool_id, model_hash, "node-b", 4, 8, throughput_tps=3.0))

    for directory in (a, b, c):
        nodes = directory.list_nodes(pool_id, model_hash)
        assert ids(nodes) == ["node-a", "node-b"]
        assert nodes[1].throughput_tps == 3.0
    assert c.list_nodes(pool_id, "other-model") == []


def test_withdraw_removes_immediately(swarm: Swarm, model: tuple[str, str]) -> None:
    a, b, c = swarm
    pool_id, model_hash = model
    node_a = make_ann(pool_id, model_hash, "node-a")
    a.announce(node_a)
    a.announce(make_ann(pool_id, model_hash, "node-b"))
    assert ids(b.list_nodes(pool_id, model_hash)) == ["node-a", "node-b"]

    # Withdrawn from a peer other than the one that announced it: the tombstone must still win.
    c.withdraw(node_a)
    for directory in (a, b, c):
        assert ids(directory.list_nodes(pool_id, model_hash)) == ["node-b"]

    # A restarted node announcing with a later expiry comes back.
    assert a.announce(make_ann(pool_id, model_hash, "node-a", ttl_s=60.0))
    assert ids(b.list_nodes(pool_id, model_hash)) == ["node-a", "node-b"]


def test_a_node_id_names_a_node_only_within_its_institution(swarm: Swarm, model: tuple[str, str]) -> None:
    """Another member's node of the same name is a node of its own: it neither replaces nor withdraws this one."""
    a, b, c = swarm
    pool_id, model_hash = model
    victim = make_ann(pool_id, model_hash, "uni-a-1", institution="Uni A")
    squatter = make_ann(pool_id, model_hash, "uni-a-1", institution="Uni B", ttl_s=120.0)
    assert a.announce(victim)
    assert b.announce(squatter)
    listed = {(n.institution, n.node_id) for n in c.list_nodes(pool_id, model_hash)}
    assert listed == {("Uni A", "uni-a-1"), ("Uni B", "uni-a-1")}

    b.withdraw(squatter)
    for directory in (a, b, c):
        assert [(n.institution, n.node_id) for n in directory.list_nodes(pool_id, model_hash)] == [("Uni A", "uni-a-1")]
    assert a.announce(make_ann(pool_id, model_hash, "uni-a-1", institution="Uni A"))  # not refused as older


def test_short_ttl_record_disappears(swarm: Swarm, model: tuple[str, str]) -> None:
    a, b, _ = swarm
    pool_id, model_hash = model
    ann = make_ann(pool_id, model_hash, "node-a", ttl_s=1.0)
    a.announce(ann)
    assert ids(b.list_nodes(pool_id, model_hash)) == ["node-a"]

    wait_for("the lapsed record to disappear", lambda: b.list_nodes(pool_id, model_hash) == [], EXPIRY_WAIT_S, 0.1)
    assert time.time() >= ann.expires_at
    assert a.list_nodes(pool_id, model_hash) == []


def test_announcer_refresh_keeps_node_alive(swarm: Swarm, model: tuple[str, str]) -> None:
    a, b, _ = swarm
    pool_id, model_hash = model
    announcer = Announcer(a, lambda: make_ann(pool_id, model_hash, "node-a").to_wire(), ttl_s=1.0, refresh_s=0.25)
    try:
        first = announcer.start().last
        assert first is not None and first.expires_at - first.announced_at == pytest.approx(1.0)
        assert ids(b.list_nodes(pool_id, model_hash)) == ["node-a"]

        # Well past the 1 s TTL, the record must still be listed at every check.
        well_past_ttl = first.expires_at + 1.0

        def listed_past_ttl() -> bool:
            assert ids(b.list_nodes(pool_id, model_hash)) == ["node-a"]
            return time.time() > well_past_ttl

        wait_for("a second past the first record's expiry", listed_past_ttl, EXPIRY_WAIT_S)
        latest = b.list_nodes(pool_id, model_hash)[0]
        assert latest.announced_at > first.announced_at + 1.0
    finally:
        stopping = threading.Thread(target=announcer.stop, daemon=True)
        stopping.start()
        stopping.join(EXPIRY_WAIT_S)
        assert not stopping.is_alive(), "stop() did not return"
    assert b.list_nodes(pool_id, model_hash) == []


def test_dead_announcer_lapses(swarm: Swarm, model: tuple[str, str]) -> None:
    a, b, _ = swarm
    pool_id, model_hash = model
    announcer = Announcer(a, lambda: make_ann(pool_id, model_hash, "node-a").to_wire(), ttl_s=1.0)
    announcer.start()
    announcer.stop(withdraw=False)  # as if the node died
    wait_for("the lapsed record to disappear", lambda: b.list_nodes(pool_id, model_hash) == [], EXPIRY_WAIT_S, 0.1)


def test_announcer_rejects_bad_periods(swarm: Swarm) -> None:
    with pytest.raises(InvalidInput):
        Announcer(swarm[0], make_ann, ttl_s=1.0, refresh_s=1.0)


def test_malformed_records_are_ignored(swarm: Swarm, model: tuple[str, str]) -> None:
    a, b, _ = swarm
    pool_id, model_hash = model
    key = directory_key(pool_id, model_hash)
    a.announce(make_ann(pool_id, model_hash, "good"))

    # A misbehaving peer writes straight into the DHT under the directory key.
    rogue = DHT(initial_peers=a.visible_maddrs(), start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        expires = get_dht_time() + 30
        good = make_ann(pool_id, model_hash, "x").to_wire()
        garbage: dict[object, object] = {
            "bytes": b"\x00\xff",
            "int": 42,
            "bad-type": {"node_id": 5},
            "bad-span": {**good, "node_id": "bad-span", "start": 9, "end": 3},
            "other-pool": {**make_ann("other-pool", model_hash, "other-pool").to_wire()},
            "wrong-subkey": {**good, "node_id": "someone-else"},
            "expired-inside": {**good, "node_id": "expired-inside", "announced_at": 1.0, "expires_at": 2.0},
            7: {**good, "node_id": "7"},
        }
        # Distinct expirations: hivemind's expiry heap compares subkeys on ties, and int < str raises.
        for i, (subkey, value) in enumerate(garbage.items()):
            assert rogue.store(key, subkey=subkey, value=value, expiration_time=expires + i * 0.01)

        assert ids(b.list_nodes(pool_id, model_hash)) == ["good"]

        # A plain (non-dictionary) value under a key is ignored as well.
        other_key = directory_key(pool_id, "plain")
        assert rogue.store(other_key, value="not a directory", expiration_time=expires)
        assert b.list_nodes(pool_id, "plain") == []
    finally:
        rogue.shutdown()


def test_validator_drops_records(swarm: Swarm, model: tuple[str, str]) -> None:
    a, b, _ = swarm
    pool_id, model_hash = model
    a.announce(make_ann(pool_id, model_hash, "trusted", institution="Trusted Lab"))
    a.announce(make_ann(pool_id, model_hash, "stranger", institution="Unknown"))

    def only_trusted(ann: NodeAnnouncement) -> bool:
        return ann.institution == "Trusted Lab"

    def broken(ann: NodeAnnouncement) -> bool:
        raise ValueError("bug in validator")

    assert ids(b.list_nodes(pool_id, model_hash)) == ["stranger", "trusted"]
    assert ids(b.list_nodes(pool_id, model_hash, validator=only_trusted)) == ["trusted"]
    assert b.list_nodes(pool_id, model_hash, validator=broken) == []


def test_expired_announcement_is_refused(swarm: Swarm) -> None:
    now = time.time()
    stale = make_ann(announced_at=now - 10, expires_at=now - 5)
    with pytest.raises(InvalidInput):
        swarm[0].announce(stale)


# --- lifecycle and errors ---------------------------------------------------------------------------


def test_bad_initial_peer_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        SwarmDirectory.start(["/ip4/127.0.0.1/tcp/1"])  # no /p2p/<peer id>
    with pytest.raises(InvalidInput):
        SwarmDirectory.start([], host="localhost")


def test_unreachable_peer_is_peer_error(swarm: Swarm) -> None:
    peer_id = swarm[0].visible_maddrs()[0].rsplit("/p2p/", 1)[1]
    with pytest.raises(PeerError):
        SwarmDirectory.start([f"/ip4/127.0.0.1/tcp/1/p2p/{peer_id}"], startup_timeout_s=15)


def test_calls_after_shutdown_raise_peer_error() -> None:
    directory = SwarmDirectory.start([])
    directory.shutdown()
    directory.shutdown()  # idempotent
    with pytest.raises(PeerError):
        directory.list_nodes("pool", "model")
    with pytest.raises(PeerError):
        directory.announce(make_ann())
