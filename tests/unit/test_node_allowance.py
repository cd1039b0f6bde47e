"""The pool decides how many nodes a member may announce: an allowance the pool CA signs into the
member's certificate (`coop member add --max-nodes N`). Readers ignore a member's nodes beyond it,
so they are never listed or routed; other members' nodes are untouched.

Real bundles, a real two-peer DHT with the pool's record validator, and the pool's own readers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from coop.cli import app
from coop.errors import InvalidInput
from coop.pool.bundle import MemberBundle
from coop.pool.ca import DEFAULT_MAX_NODES, load_cert, max_nodes_of, member_certificate
from coop.pool.registry import PoolInfo, add_member, create_pool, load_ca
from coop.swarm.announcement import AnnouncementVerifier, stamp_announcement
from coop.swarm.directory import SwarmDirectory
from coop.swarm.node_key import NodeKey
from coop.swarm.routing import choose_route
from coop.swarm.validation import PoolRecordValidator
from tests.swarms import two_peer_swarm

MODEL = "allowance-model"
NUM_BLOCKS = 4
GREEDY_ALLOWANCE = 2
GREEDY_NODES = ("g-0", "g-1", "g-2", "g-3", "g-4")  # g-2.. are beyond the allowance
FAST_TPS = 1e6  # the excess nodes claim to be far faster than anyone: were they listed, they would be routed


def _member_cert(bundle: MemberBundle) -> x509.Certificate:
    return load_cert(bundle.cert_pem, "member certificate")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, MemberBundle]:
    pool_dir = tmp_path_factory.mktemp("allowance") / "pool"
    create_pool(pool_dir, "Allowance pool")
    return {
        "Greedy": MemberBundle.load(add_member(pool_dir, "Greedy", max_nodes=GREEDY_ALLOWANCE)),
        "Honest": MemberBundle.load(add_member(pool_dir, "Honest")),
        "Reader": MemberBundle.load(add_member(pool_dir, "Reader")),
    }


@pytest.fixture(scope="module")
def swarm(bundles: dict[str, MemberBundle]) -> Iterator[tuple[SwarmDirectory, SwarmDirectory]]:
    reader = bundles["Reader"]
    validator = PoolRecordValidator(
        reader.pool_id, reader.ca_cert_pem, AnnouncementVerifier(reader.ca_cert_pem, reader.pool_id)
    )
    with two_peer_swarm(validator) as peers:
        yield peers


def _announce(directory: SwarmDirectory, bundle: MemberBundle, node_id: str, throughput_tps: float) -> None:
    fields = {
        "node_id": node_id,
        "pool_id": bundle.pool_id,
        "model_hash": MODEL,
        "start": 0,
        "end": NUM_BLOCKS,
        "endpoint": "127.0.0.1:50051",
        "institution": bundle.institution,
        "throughput_tps": throughput_tps,
        "free_cache_bytes": 1 << 30,
    }
    signer = bundle.credentials(node_id)
    assert directory.announce(stamp_announcement(fields, now=time.time(), ttl_s=60.0, bundle=signer))


def test_the_allowance_is_signed_into_the_member_certificate(bundles: dict[str, MemberBundle]) -> None:
    assert max_nodes_of(_member_cert(bundles["Greedy"])) == GREEDY_ALLOWANCE
    assert max_nodes_of(_member_cert(bundles["Honest"])) == DEFAULT_MAX_NODES


def test_a_members_nodes_beyond_its_allowance_are_never_listed_or_routed(
    bundles: dict[str, MemberBundle], swarm: tuple[SwarmDirectory, SwarmDirectory]
) -> None:
    writer, reader = swarm
    for node_id in reversed(GREEDY_NODES):  # announced newest-first: the order of arrival decides nothing
        _announce(writer, bundles["Greedy"], node_id, FAST_TPS)
    _announce(writer, bundles["Honest"], "h-0", 10.0)
    verifier = AnnouncementVerifier(bundles["Reader"].ca_cert_pem, bundles["Reader"].pool_id)

    listed = reader.list_nodes(bundles["Reader"].pool_id, MODEL, verifier)
    assert {(n.institution, n.node_id) for n in listed} == {("Greedy", "g-0"), ("Greedy", "g-1"), ("Honest", "h-0")}

    routed = set()
    load: dict[NodeKey, int] = {}
    for _ in range(10):  # sessions pile up on the fast nodes until the honest one is cheaper
        for hop in choose_route(listed, NUM_BLOCKS, load=load):
            routed.add(hop.node_id)
            load[hop.key] = load.get(hop.key, 0) + 1
    assert routed <= {"g-0", "g-1", "h-0"}


def test_member_add_takes_the_allowance(tmp_path: Path) -> None:
    pool_dir = tmp_path / "pool"
    runner = CliRunner()
    assert runner.invoke(app, ["pool", "init", str(pool_dir), "--name", "CLI Pool"]).exit_code == 0
    added = runner.invoke(app, ["member", "add", "Uni X", "--pool", str(pool_dir), "--max-nodes", "3"])
    assert added.exit_code == 0, added.output
    assert max_nodes_of(_member_cert(MemberBundle.load(pool_dir / "members" / "Uni X.bundle"))) == 3
    refused = runner.invoke(app, ["member", "add", "Uni Y", "--pool", str(pool_dir), "--max-nodes", "0"])
    assert refused.exit_code != 0 and "allowance" in refused.output


def test_an_allowance_out_of_range_is_refused(tmp_path: Path) -> None:
    info = create_pool(tmp_path / "pool", "Range pool")
    ca_key, ca_cert = load_ca(PoolInfo.load(info.directory))
    with pytest.raises(InvalidInput, match="allowance"):
        member_certificate(ca_key, ca_cert, info.pool_id, "Uni Z", max_nodes=0)
