"""A revocation survives the loss of any one copy: bundles carry it, processes keep it on disk, and
whoever holds it puts it back into a DHT that lost it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coop.errors import InvalidInput
from coop.pool.bundle import MemberBundle
from coop.pool.membership import Membership
from coop.pool.registry import MEMBERS_DIR, REVOCATIONS_FILE, add_member, read_revocations, revoke_member
from coop.pool.revocation import Revocations, saved_revocations_path
from coop.swarm.directory import SwarmDirectory
from coop.swarm.revocations import refresh_revocations, revocations_key
from coop.swarm.validation import pool_record_validator
from tests.pools import MemberPool, make_member_pool


@pytest.fixture
def pool(tmp_path: Path) -> MemberPool:
    return make_member_pool(tmp_path / "pool")


def bundle_path(pool: MemberPool, institution: str) -> Path:
    return pool.directory / MEMBERS_DIR / f"{institution}.bundle"


def test_new_bundles_carry_the_current_list(pool: MemberPool) -> None:
    assert pool["alpha"].revocations == read_revocations(pool.info)  # the empty list of a new pool
    revoked = revoke_member(pool.directory, "beta")
    late = add_member(pool.directory, "late")
    assert MemberBundle.load(late).revocations == revoked
    assert Membership.load(late).revocations.names == {"beta"}
    assert Membership.load(bundle_path(pool, "alpha")).revocations.names == frozenset()  # made before


def test_a_process_keeps_the_newest_list_next_to_its_bundle(pool: MemberPool) -> None:
    path = bundle_path(pool, "alpha")
    membership = Membership.load(path)
    saved = saved_revocations_path(path)
    assert membership.revocations.path == saved

    first = revoke_member(pool.directory, "beta")
    assert membership.revocations.offer(first)
    second = revoke_member(pool.directory, "coord")
    assert membership.revocations.offer(second)
    assert not membership.revocations.offer(first)  # older: neither taken nor saved
    assert saved.read_bytes() == second.to_bytes()

    restarted = Membership.load(path)  # its bundle predates both revocations
    assert restarted.revocations.names == {"beta", "coord"}
    assert restarted.revocations.current == second


def test_a_saved_list_that_does_not_verify_stops_the_start(pool: MemberPool) -> None:
    path = bundle_path(pool, "alpha")
    doc = revoke_member(pool.directory, "beta").to_dict()
    saved = saved_revocations_path(path)
    saved.write_text(json.dumps({**doc, "revoked": []}))  # un-revoking by editing the file
    with pytest.raises(InvalidInput, match=r"replace it with the pool's revocations\.json"):
        Membership.load(path)


def test_revocations_come_from_files_and_return_to_a_dht_that_lost_them(pool: MemberPool) -> None:
    path = bundle_path(pool, "alpha")
    membership = Membership.load(path)
    pool_file = pool.directory / REVOCATIONS_FILE
    with SwarmDirectory.start([], validator=pool_record_validator(membership)) as empty_dht:
        key = revocations_key(pool.pool_id)
        assert empty_dht.fetch_blobs(key) == []
        refresh_revocations(membership.revocations, empty_dht, [pool_file])
        assert empty_dht.fetch_blobs(key) == [read_revocations(pool.info).to_bytes()]  # the bundle's list

        revoked = revoke_member(pool.directory, "beta")  # the admin's file only, no DHT
        refresh_revocations(membership.revocations, empty_dht, [pool_file, pool.directory / "missing.json"])
        assert membership.revocations.names == {"beta"}
        assert revoked.to_bytes() in empty_dht.fetch_blobs(key)
        assert saved_revocations_path(path).read_bytes() == revoked.to_bytes()


def test_development_mode_has_no_list(tmp_path: Path) -> None:
    revocations = Revocations(None, "default", tmp_path / "x.revocations")
    assert Membership.load(None).revocations.path is None
    assert not revocations.offer(read_revocations(make_member_pool(tmp_path / "pool").info))
    assert not (tmp_path / "x.revocations").exists()
