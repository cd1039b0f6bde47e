"""Pools for tests: with member bundles, made the way an admin makes one (`coop pool create`, `coop member
add`), or a development-mode pool of real processes (`running_pool`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from coop.launcher import LocalPool
from coop.pool import ca
from coop.pool.bundle import MemberBundle
from coop.pool.ca import ROLE_COORDINATOR, ROLE_MEMBER
from coop.pool.registry import PoolInfo, add_member, create_pool

MEMBERS = ("alpha", "beta", "coord")
COORDINATORS = frozenset({"coord"})  # these get a pool coordinator's bundle, the others a member's


@dataclass(frozen=True)
class MemberPool:
    info: PoolInfo
    bundles: dict[str, MemberBundle]

    @property
    def pool_id(self) -> str:
        return self.info.pool_id

    @property
    def directory(self) -> Path:
        return self.info.directory

    def __getitem__(self, institution: str) -> MemberBundle:
        return self.bundles[institution]


def make_member_pool(directory: Path, name: str = "test", members: Sequence[str] = MEMBERS) -> MemberPool:
    info = create_pool(directory, name)
    roles = {m: ROLE_COORDINATOR if m in COORDINATORS else ROLE_MEMBER for m in members}
    return MemberPool(info, {m: MemberBundle.load(add_member(directory, m, role=roles[m])) for m in members})


@contextmanager
def certificates_backdated(by: dt.timedelta) -> Iterator[None]:
    """Certificates issued inside are valid from `by` ago: for tests that book a history of receipts,
    since a receipt counts only if its signer's certificate was valid when the work ended."""
    with mock.patch.object(ca, "CLOCK_SKEW", by):
        yield


@contextmanager
def running_pool(model_dir: str, spans: Mapping[str, str]) -> Iterator[LocalPool]:
    """A development-mode pool (no bundles): a DHT, a node per span, a coordinator; all stopped on exit."""
    pool = LocalPool(model_dir)
    try:
        pool.start_dht()
        pool.start_nodes(dict(spans))
        pool.start_coordinator()
        yield pool
    finally:
        pool.stop()
