"""The pool's revocation list in the DHT: published by `coop member revoke`, watched by every process.

Every member process re-reads it every `REVOCATION_POLL_S` seconds and keeps the newest list whose
signature checks out. A revoked institution's nodes then drop out of routes, sessions through them
fail over, and its certificates are refused at every call.
"""

from __future__ import annotations

import logging
import time

from coop.errors import CoopError
from coop.pool.revocation import RevocationList, Revocations
from coop.swarm.directory import SwarmDirectory
from coop.swarm.periodic import Periodic

log = logging.getLogger(__name__)

REVOCATION_POLL_S = 10.0
REVOCATION_TTL_S = 365 * 24 * 3600.0


def revocations_key(pool_id: str) -> str:
    return f"coop/v1/pools/{pool_id}/revocations"


def publish_revocations(directory: SwarmDirectory, revocations: RevocationList) -> bool:
    expires_at = max(revocations.issued_at, time.time()) + REVOCATION_TTL_S
    key = revocations_key(revocations.pool_id)
    return directory.publish_blob(key, f"{revocations.issued_at:.6f}", revocations.to_bytes(), expires_at)


def refresh_revocations(revocations: Revocations, directory: SwarmDirectory) -> None:
    """Offer every list stored in the DHT; anyone can write there, so no blob may raise."""
    if revocations.ca_cert_pem is None:
        return
    try:
        blobs = directory.fetch_blobs(revocations_key(revocations.pool_id))
    except CoopError as exc:
        log.warning("could not read the revocation list from the DHT: %s", exc)
        return
    for blob in blobs:
        try:
            accepted = revocations.offer(RevocationList.from_bytes(blob))
        except Exception as exc:
            log.warning("ignoring a revocation list that does not verify: %s", type(exc).__name__)
            continue
        if accepted:
            log.warning("revoked institutions now: %s", sorted(revocations.names))


class RevocationWatcher:
    """Refreshes a process's revocation list from the DHT now, then every period_s until stop()."""

    def __init__(self, revocations: Revocations, directory: SwarmDirectory, period_s: float = REVOCATION_POLL_S):
        self.revocations = revocations
        self.directory = directory
        self._refresher = Periodic(self.refresh, period_s, "coop-revocations")

    def refresh(self) -> None:
        refresh_revocations(self.revocations, self.directory)

    def start(self) -> RevocationWatcher:
        self.refresh()
        if self.revocations.ca_cert_pem is not None:  # development mode has no list to watch
            self._refresher.start()
        return self

    def stop(self) -> None:
        self._refresher.stop(timeout_s=5)
