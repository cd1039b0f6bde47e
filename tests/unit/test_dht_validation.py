"""The pool's DHT record validator: only records the pool signed are stored or believed.

Records are built the way hivemind hands them to a validator (hashed key, msgpack subkey and value),
then one real swarm of validating peers is attacked by a bare hivemind peer without validators.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hivemind import DHT
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from coop.pool.bundle import Credentials, MemberBundle
from coop.pool.membership import Membership
from coop.pool.registry import MEMBERS_DIR, load_ca, read_revocations
from coop.pool.revocation import RevocationList
from coop.swarm.announcement import (
    AnnouncementVerifier,
    NodeAnnouncement,
    Withdrawal,
    announcement_payload,
    stamp_announcement,
    stamp_withdrawal,
    withdrawal_payload,
)
from coop.swarm.directory import SwarmDirectory, directory_key
from coop.swarm.node_key import NodeKey
from coop.swarm.revocations import REVOCATION_TTL_S, publish_revocations, revocations_key, revocations_subkey
from coop.swarm.validation import PoolRecordValidator, pool_record_validator
from tests.pools import MemberPool, make_member_pool
from tests.swarms import two_peer_swarm

MODEL = "model-1"
TEN_YEARS_S = 10 * 365 * 24 * 3600.0
TTL_S = 9.0


@dataclass(frozen=True)
class Pools:
    ours: MemberPool
    other: MemberPool
    validator: PoolRecordValidator

    @property
    def pool_id(self) -> str:
        return self.ours.pool_id


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Pools:
    root = tmp_path_factory.mktemp("dht-validation")
    ours, other = make_member_pool(root / "ours"), make_member_pool(root / "other", "other")
    ca = ours.info.ca_cert_pem()
    return Pools(ours, other, PoolRecordValidator(ours.pool_id, ca, AnnouncementVerifier(ca, ours.pool_id)))


def fields(bundle: MemberBundle, node_id: str = "node-a", **overrides: object) -> dict[str, object]:
    return {
        "node_id": node_id,
        "pool_id": bundle.pool_id,
        "model_hash": MODEL,
        "start": 0,
        "end": 4,
        "endpoint": "127.0.0.1:50051",
        "institution": bundle.institution,
        "throughput_tps": 10.0,
        "free_cache_bytes": 1 << 30,
        **overrides,
    }


_NODES: dict[tuple[str, str, str], Credentials] = {}


def node(bundle: MemberBundle, node_id: str = "node-a") -> Credentials:
    """The credentials a node of bundle's institution makes for itself (one per node id)."""
    key = (bundle.pool_id, bundle.institution, node_id)
    if key not in _NODES:
        _NODES[key] = bundle.credentials(node_id)
    return _NODES[key]


def announce(
    bundle: MemberBundle | None, *, of: MemberBundle, now: float | None = None, ttl_s: float = TTL_S
) -> NodeAnnouncement:
    """of's node announcement, signed by bundle's node-a (None: unsigned)."""
    signer = None if bundle is None else node(bundle)
    return stamp_announcement(fields(of), now=time.time() if now is None else now, ttl_s=ttl_s, bundle=signer)


def signed_by(bundle: MemberBundle, ann: NodeAnnouncement, node_id: str | None = None) -> NodeAnnouncement:
    """ann with the certificate and signature of bundle's node (ann's own id by default), whatever ann says."""
    signer = node(bundle, node_id or ann.node_id)
    with_cert = NodeAnnouncement.model_validate({**ann.to_wire(), "certificate": signer.chain_pem})
    return with_cert.model_copy(update={"signature": signer.sign(announcement_payload(with_cert))})


def signed_by_member(bundle: MemberBundle, ann: NodeAnnouncement) -> NodeAnnouncement:
    """ann signed by the institution's own (CA) certificate instead of a node's."""
    with_cert = NodeAnnouncement.model_validate({**ann.to_wire(), "certificate": bundle.cert_pem})
    return with_cert.model_copy(update={"signature": bundle.sign(announcement_payload(with_cert))})


def record(key: str, subkey: object, value: object, expiration_time: float) -> DHTRecord:
    """What hivemind hands a validator: the key hashed, subkey and value as msgpack."""
    dumps = MSGPackSerializer.dumps
    return DHTRecord(DHTID.generate(key).to_bytes(), dumps(subkey), dumps(value), expiration_time)


def node_record(
    rec: NodeAnnouncement | Withdrawal,
    *,
    model_hash: str = MODEL,
    subkey: str | None = None,
    expiration_time: float | None = None,
) -> DHTRecord:
    """rec stored as its node stores it, unless told otherwise."""
    return record(
        directory_key(rec.pool_id, model_hash),
        str(NodeKey(rec.institution, rec.node_id)) if subkey is None else subkey,
        rec.to_wire(),
        rec.expires_at if expiration_time is None else expiration_time,
    )


def revocation_record(
    revocations: RevocationList, *, subkey: str | None = None, expires_in_s: float = 60.0
) -> DHTRecord:
    return record(
        revocations_key(revocations.pool_id),
        revocations_subkey(revocations) if subkey is None else subkey,
        revocations.to_bytes(),
        time.time() + expires_in_s,
    )


def withdrawal_signed_by(bundle: MemberBundle, ann: NodeAnnouncement) -> Withdrawal:
    """ann's tombstone with bundle's certificate and signature, whatever its pool and institution say."""
    signer = node(bundle, ann.node_id)
    with_cert = tombstone(None, ann).model_copy(update={"certificate": signer.chain_pem})
    return with_cert.model_copy(update={"signature": signer.sign(withdrawal_payload(with_cert))})


def tombstone(bundle: MemberBundle | None, ann: NodeAnnouncement, lifetime_s: float = 1.0) -> Withdrawal:
    signer = None if bundle is None else node(bundle, ann.node_id)
    return stamp_withdrawal(ann, now=time.time(), expires_at=ann.expires_at + lifetime_s, bundle=signer)


# --------------------------------------------------------------------------------------------- accepted


def _accepted_cases(p: Pools) -> dict[str, DHTRecord]:
    alpha = p.ours["alpha"]
    ann = announce(alpha, of=alpha)
    current = read_revocations(p.ours.info)
    return {
        "signed announcement": node_record(ann),
        "signed announcement stored to expire sooner": node_record(ann, expiration_time=ann.expires_at - 1),
        "signed withdrawal": node_record(tombstone(alpha, ann)),
        "CA-signed revocation list": revocation_record(current, expires_in_s=REVOCATION_TTL_S),
    }


@pytest.mark.parametrize(
    "case",
    [
        "signed announcement",
        "signed announcement stored to expire sooner",
        "signed withdrawal",
        "CA-signed revocation list",
    ],
)
def test_pool_records_are_accepted(pools: Pools, case: str) -> None:
    assert pools.validator.validate(_accepted_cases(pools)[case])


# --------------------------------------------------------------------------------------------- refused


def _refused_cases(p: Pools) -> dict[str, Callable[[], DHTRecord]]:
    alpha, beta, outsider = p.ours["alpha"], p.ours["beta"], p.other["alpha"]
    pool_id, now = p.pool_id, time.time()
    ann = announce(alpha, of=alpha)
    key = directory_key(pool_id, MODEL)
    ca_key, _ = load_ca(p.other.info)
    current = read_revocations(p.ours.info)
    forged_list = RevocationList(pool_id, ("alpha",), (), now).signed(ca_key)
    moved_tombstone = tombstone(alpha, ann).model_copy(update={"node_id": "node-b"})
    return {
        "plain value under the directory key": lambda: record(key, None, "erased", now + TEN_YEARS_S),
        "plain value under the revocation key": lambda: record(revocations_key(pool_id), None, b"x", now + TEN_YEARS_S),
        "junk entry under the directory key": lambda: record(key, "node-a", "junk", now + 5),
        "record under a foreign key": lambda: record("some/other/key", "node-a", ann.to_wire(), ann.expires_at),
        "record under another model's key": lambda: node_record(ann, model_hash="other-model"),
        "record under another node's subkey": lambda: node_record(ann, subkey="node-b"),
        "record under its bare node id": lambda: node_record(ann, subkey="node-a"),
        "another member's same-named node under this node's subkey": lambda: node_record(
            announce(beta, of=beta), subkey=str(NodeKey("alpha", "node-a"))
        ),
        "another member's same-named withdrawal under this node's subkey": lambda: node_record(
            tombstone(beta, announce(beta, of=beta)), subkey=str(NodeKey("alpha", "node-a"))
        ),
        "unsigned announcement": lambda: node_record(announce(None, of=alpha)),
        "forged signature": lambda: node_record(ann.model_copy(update={"endpoint": "10.6.6.6:1"})),
        "signed for another institution": lambda: node_record(signed_by(alpha, announce(None, of=beta))),
        "signed by another node of the member": lambda: node_record(signed_by(alpha, ann, node_id="node-z")),
        "signed by the member certificate itself": lambda: node_record(signed_by_member(alpha, ann)),
        "signed by another pool's member": lambda: node_record(signed_by(outsider, announce(None, of=alpha))),
        "record of another pool": lambda: node_record(announce(outsider, of=outsider)),
        "ten-year expiry": lambda: node_record(ann, expiration_time=now + TEN_YEARS_S),
        "signed to live too long": lambda: node_record(announce(alpha, of=alpha, now=now - 900.0, ttl_s=1000.0)),
        "signed far in the future": lambda: node_record(announce(alpha, of=alpha, now=now + 1000.0)),
        "replayed old record with a later expiry": lambda: node_record(
            announce(alpha, of=alpha, now=now - 300.0), expiration_time=now + 60.0
        ),
        "old-style unsigned tombstone": lambda: record(key, "node-a", None, now + TEN_YEARS_S),
        "unsigned tombstone": lambda: node_record(tombstone(None, ann)),
        "tombstone signed by another pool's member": lambda: node_record(withdrawal_signed_by(outsider, ann)),
        "tombstone moved to another node": lambda: node_record(moved_tombstone),
        "tombstone with a ten-year expiry": lambda: node_record(
            tombstone(alpha, ann), expiration_time=now + TEN_YEARS_S
        ),
        "tombstone signed to live too long": lambda: node_record(
            stamp_withdrawal(ann, now=now - 900.0, expires_at=now + 100.0, bundle=node(alpha))
        ),
        "unsigned revocation list": lambda: revocation_record(RevocationList(pool_id, (), (), now)),
        "revocation list signed by another CA": lambda: revocation_record(forged_list),
        "revocation list under another version's subkey": lambda: revocation_record(current, subkey="9999999999.0"),
        "revocation list with a ten-year expiry": lambda: revocation_record(current, expires_in_s=TEN_YEARS_S),
        "another pool's revocation list": lambda: revocation_record(read_revocations(p.other.info)),
        "revocation list that is not bytes": lambda: record(
            revocations_key(pool_id), revocations_subkey(current), current.to_dict(), now + 60
        ),
        "bytes that are not msgpack": lambda: DHTRecord(DHTID.generate(key).to_bytes(), b"\xc1", b"\xc1\xff", now + 5),
    }


REFUSED = {  # case: why (a regular expression on the refusal)
    "plain value under the directory key": "plain value",
    "plain value under the revocation key": "plain value",
    "junk entry under the directory key": "must be a map",
    "record under a foreign key": "not stored under its model's directory key",
    "record under another model's key": "not stored under its model's directory key",
    "record under another node's subkey": "under another node's subkey",
    "record under its bare node id": "under another node's subkey",
    "another member's same-named node under this node's subkey": "of 'beta' is stored under another node's subkey",
    "another member's same-named withdrawal under this node's subkey": "of 'beta' is stored under another",
    "unsigned announcement": "not signed",
    "forged signature": "signature does not match",
    "signed for another institution": "cannot sign for node 'node-a' of 'beta'",
    "signed by another node of the member": "cannot sign for node 'node-a'",
    "signed by the member certificate itself": "is not a node",
    "signed by another pool's member": "belongs to pool",
    "record of another pool": "record is for pool",
    "ten-year expiry": "later than it was signed to",
    "signed to live too long": "signed to live longer than 120 s",
    "signed far in the future": "more than 120 s from now",
    "replayed old record with a later expiry": "later than it was signed to",
    "old-style unsigned tombstone": "must be a map",
    "unsigned tombstone": "not signed",
    "tombstone signed by another pool's member": "belongs to pool",
    "tombstone moved to another node": "cannot sign for node .node-b.",
    "tombstone with a ten-year expiry": "later than it was signed to",
    "tombstone signed to live too long": "withdrawal is signed to live longer",
    "unsigned revocation list": "not signed by the pool CA",
    "revocation list signed by another CA": "not signed by the pool CA",
    "revocation list under another version's subkey": "another version's subkey",
    "revocation list with a ten-year expiry": "more than 31536000 s from now",
    "another pool's revocation list": "must be a map",
    "revocation list that is not bytes": "stored as bytes",
    "bytes that are not msgpack": "",
}


@pytest.mark.parametrize("case", REFUSED)
def test_everything_else_is_refused(pools: Pools, case: str) -> None:
    cases = _refused_cases(pools)
    assert sorted(cases) == sorted(REFUSED)
    rec = cases[case]()
    assert not pools.validator.validate(rec)
    with pytest.raises(Exception, match=REFUSED[case]):
        pools.validator.check(rec)


def test_withdrawal_signature_covers_every_field(pools: Pools) -> None:
    alpha = pools.ours["alpha"]
    signed = tombstone(alpha, announce(alpha, of=alpha))
    moved = signed.model_copy(update={"node_id": "node-b"})
    assert withdrawal_payload(moved) != withdrawal_payload(signed)
    assert AnnouncementVerifier(alpha.ca_cert_pem, alpha.pool_id).check_signed(signed, withdrawal_payload(signed))


def test_the_validator_pickles_for_the_dht_process(pools: Pools) -> None:
    alpha = pools.ours["alpha"]
    copy = pickle.loads(pickle.dumps(pools.validator))
    assert copy.validate(node_record(announce(alpha, of=alpha)))
    assert not copy.validate(node_record(announce(None, of=alpha)))


def test_pool_processes_validate_and_development_mode_does_not(pools: Pools) -> None:
    validator = pool_record_validator(Membership.load(pools.ours.directory / MEMBERS_DIR / "beta.bundle"))
    assert validator is not None and validator.pool_id == pools.pool_id
    assert pool_record_validator(Membership.load(None)) is None


# ------------------------------------------------------------------------------ a real swarm attacked


@pytest.fixture
def swarm(pools: Pools) -> Iterator[tuple[SwarmDirectory, SwarmDirectory]]:
    with two_peer_swarm(pools.validator) as peers:
        yield peers


def test_validating_peers_keep_the_directory_from_a_bare_peer(
    pools: Pools, swarm: tuple[SwarmDirectory, SwarmDirectory]
) -> None:
    first, second = swarm
    alpha, pool_id = pools.ours["alpha"], pools.pool_id
    assert first.announce(announce(alpha, of=alpha, ttl_s=60.0))

    rogue = DHT(initial_peers=first.visible_maddrs(), start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        far = get_dht_time() + TEN_YEARS_S
        key = directory_key(pool_id, MODEL)
        rogue.store(key, subkey="node-a", value=None, expiration_time=far)  # forged tombstone
        rogue.store(key, value="erased", expiration_time=far + 1)
        rogue.store(revocations_key(pool_id), value=b"hidden", expiration_time=far)

        for directory in (first, second):
            assert [n.node_id for n in directory.list_nodes(pool_id, MODEL)] == ["node-a"]
        later = announce(alpha, of=alpha, ttl_s=90.0)
        assert second.announce(later), "a re-announcement must still land"
        assert first.list_nodes(pool_id, MODEL) == [later]

        current = read_revocations(pools.ours.info)
        assert publish_revocations(second, current)
        assert first.fetch_blobs(revocations_key(pool_id)) == [current.to_bytes()]

        second.withdraw(later, node(alpha))  # the signed tombstone is accepted where the forged one was not
        assert first.list_nodes(pool_id, MODEL) == []
    finally:
        rogue.shutdown()
