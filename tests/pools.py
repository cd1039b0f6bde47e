"""Pools for tests, the one place they are made: on disk the way an admin makes one (`coop pool create`,
`coop member add`, `coop key create`: `make_pool`), with every bundle loaded (`make_member_pool`), or a
development-mode pool of real processes (`running_pool`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from coop.launcher import CoopProcess, LocalPool
from coop.ledger.database import ledger_location, sqlite_url
from coop.ledger.store import Ledger
from coop.model.manifest import Manifest
from coop.pool import ca
from coop.pool.bundle import MemberBundle
from coop.pool.ca import ROLE_COORDINATOR
from coop.pool.registry import API_KEYS_FILE, PoolInfo, add_member, create_api_key, create_pool
from tests.chat_requests import answered_chat

MEMBERS = ("alpha", "beta", "coord")
COORDINATORS = frozenset({"coord"})  # these get a pool coordinator's bundle, the others a member's


@dataclass(frozen=True)
class PoolOnDisk:
    """A pool's directory as the admin has it: the admin token, every bundle written, an API key each."""

    info: PoolInfo
    bundles: dict[str, Path]  # institution -> its bundle file (a member's or a pool coordinator's)
    keys: dict[str, str]  # institution -> an API key of it

    @property
    def directory(self) -> Path:
        return self.info.directory

    @property
    def admin_token(self) -> str:
        assert self.info.admin_token is not None  # create_pool's PoolInfo carries it
        return self.info.admin_token

    @property
    def api_keys_file(self) -> Path:
        return self.directory / API_KEYS_FILE

    def ledger(self) -> Ledger:
        """The ledger the pool's coordinator books into (the pool directory's, as `coop ledger` opens it)."""
        return Ledger.open(ledger_location(None, self.directory))

    def start_coordinator(self, pool: LocalPool, coordinator: str, extra_args: Sequence[str] = ()) -> CoopProcess:
        """Start `pool`'s coordinator as `coordinator` (a pool coordinator's bundle), with the pool's API
        keys and directory (its ledger, its revocations)."""
        args = ["--pool-dir", str(self.directory), *extra_args]
        return pool.start_coordinator(member=self.bundles[coordinator], api_keys=self.api_keys_file, extra_args=args)


@dataclass
class ServedPool:
    """A running pool with the directory it was made in, its bundles, the API key tests call it with, its model."""

    pool: LocalPool
    pool_dir: Path
    bundles: dict[str, Path]
    key: str
    manifest: Manifest

    @property
    def ledger(self) -> Ledger:
        return Ledger.open(sqlite_url(self.pool_dir / "ledger.db"))

    def greedy_chat(self, question: str, max_tokens: int) -> Any:
        """The body of a greedy chat with the pool's API key, which must succeed."""
        return answered_chat(self.pool.url, self.key, question, max_tokens)


def make_pool(
    directory: Path,
    name: str,
    members: Sequence[str],
    coordinators: Sequence[str] = (),
    api_keys: Sequence[str] = (),
) -> PoolOnDisk:
    """A new pool in `directory` with these members, pool coordinators, and an API key for each of `api_keys`."""
    info = create_pool(directory, name)
    bundles = {m: add_member(directory, m) for m in members}
    bundles |= {c: add_member(directory, c, role=ROLE_COORDINATOR) for c in coordinators}
    return PoolOnDisk(info, bundles, {m: create_api_key(directory, m) for m in api_keys})


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
    coordinators = [m for m in members if m in COORDINATORS]
    disk = make_pool(directory, name, [m for m in members if m not in COORDINATORS], coordinators)
    return MemberPool(disk.info, {m: MemberBundle.load(disk.bundles[m]) for m in members})


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
