"""The pool's revocation list in the DHT: published by `coop member revoke`, watched by every process.

Every member process re-reads it every `REVOCATION_POLL_S` seconds (and any revocations.json it was
pointed at, e.g. the coordinator's pool directory) and keeps the newest list whose signature checks
out. A revoked institution's nodes then drop out of routes, sessions through them fail over, and its
certificates are refused at every call. A process that finds the DHT without the list it holds
publishes it again, so a list lost from the DHT comes back as soon as any member process runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from coop.errors import CoopError
from coop.pool.revocation import RevocationList, Revocations
from coop.swarm.directory import SwarmDirectory
from coop.swarm.periodic import Periodic

log = logging.getLogger(__name__)

REVOCATION_POLL_S = 10.0
REVOCATION_TTL_S = 365 * 24 * 3600.0


def revocations_key(pool_id: str) -> str:
    return f"coop/v1/pools/{pool_id}/revocations"


def revocations_subkey(revocations: RevocationList) -> str:
    """One subkey per version: a newer list is added beside older ones, never overwritten by them."""
    return f"{revocations.issued_at:.6f}"


def publish_revocations(directory: SwarmDirectory, revocations: RevocationList) -> bool:
    expires_at = max(revocations.issued_at, time.time()) + REVOCATION_TTL_S
    key = revocations_key(revocations.pool_id)
    return directory.publish_blob(key, revocations_subkey(revocations), revocations.to_bytes(), expires_at)


def refresh_revocations(revocations: Revocations, directory: SwarmDirectory, files: Sequence[Path] = ()) -> None:
    """Offer every list in files and in the DHT, then republish ours if the DHT has none as new.

    Anyone can write to the DHT and files can be stale or broken, so no list may raise.
    """
    if revocations.ca_cert_pem is None:
        return
    for path in files:
        try:
            revocations.offer(RevocationList.load(path, revocations.ca_cert_pem))
        except CoopError as exc:
            log.warning("ignoring revocation list %s: %s", path, exc)
    try:
        blobs = directory.fetch_blobs(revocations_key(revocations.pool_id))
    except CoopError as exc:
        log.warning("could not read the revocation list from the DHT: %s", exc)
        return
    newest_in_dht = 0.0
    for blob in blobs:
        try:
            candidate = RevocationList.from_bytes(blob)
            accepted = revocations.offer(candidate)
        except Exception as exc:
            log.warning("ignoring a revocation list that does not verify: %s", type(exc).__name__)
            continue
        newest_in_dht = max(newest_in_dht, candidate.issued_at)
        if accepted:
            log.warning("revoked institutions now: %s", sorted(revocations.names))
    ours = revocations.current
    if ours is not None and ours.issued_at > newest_in_dht:
        try:
            publish_revocations(directory, ours)
        except CoopError as exc:
            log.warning("could not republish the revocation list to the DHT: %s", exc)


class RevocationWatcher:
    """Refreshes a process's revocation list from files and the DHT now, then every period_s until stop()."""

    def __init__(
        self,
        revocations: Revocations,
        directory: SwarmDirectory,
        period_s: float = REVOCATION_POLL_S,
        files: Sequence[Path] = (),
    ) -> None:
        """`files`: revocations.json copies to re-read each time (e.g. the pool directory's)."""
        self.revocations = revocations
        self.directory = directory
        self.files = tuple(files)
        self._refresher = Periodic(self.refresh, period_s, "coop-revocations")

    def refresh(self) -> None:
        refresh_revocations(self.revocations, self.directory, self.files)

    def start(self) -> RevocationWatcher:
        self.refresh()
        if self.revocations.ca_cert_pem is not None:  # development mode has no list to watch
            self._refresher.start()
        return self

    def stop(self) -> None:
        self._refresher.stop(timeout_s=5)
