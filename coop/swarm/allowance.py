"""How many nodes of one member a reader believes: at most the allowance the pool CA signed into the
member's certificate (`coop.pool.ca.max_nodes_of`), per model.

A member mints node ids at will, so without a cap one member could crowd a model's directory with
nodes and take most routes. Which of a member's nodes are kept beyond its allowance is decided by
the member's own records alone — the ones with the smallest node ids — so the choice is the same
for every reader and one member's records can never push another member's node out.

Records reach this point already verified (`AnnouncementVerifier`): the member certificate read here
is the one that vouched for the node.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from cryptography import x509

from coop.errors import Unauthorized
from coop.pool.ca import max_nodes_of
from coop.swarm.announcement import NodeAnnouncement

logger = logging.getLogger(__name__)


def _member_certificate(ann: NodeAnnouncement) -> x509.Certificate | None:
    """The member certificate in ann's chain (leaf first), or None if ann carries no chain."""
    try:
        certs = x509.load_pem_x509_certificates(ann.certificate)
    except (ValueError, TypeError):
        return None
    return certs[1] if len(certs) == 2 else None


def _allowance(records: Sequence[NodeAnnouncement]) -> int | None:
    """The allowance of the newest member certificate among records (the admin's latest word); None: no chain."""
    certs = [cert for cert in map(_member_certificate, records) if cert is not None]
    if not certs:
        return None
    newest = max(certs, key=lambda cert: (cert.not_valid_before_utc, cert.serial_number))
    try:
        return max_nodes_of(newest)
    except Unauthorized:
        return 0


def within_allowance(nodes: Sequence[NodeAnnouncement]) -> list[NodeAnnouncement]:
    """nodes less each member's nodes beyond its allowance (order kept).

    Records without a certificate chain (development mode) are not capped: nothing vouches for
    them, and nothing would sign an allowance.
    """
    by_member: dict[str, list[NodeAnnouncement]] = defaultdict(list)
    for node in nodes:
        by_member[node.institution].append(node)
    dropped: set[tuple[str, str]] = set()
    for institution, records in by_member.items():
        allowance = _allowance(records)
        if allowance is None or len(records) <= allowance:
            continue
        excess = sorted(records, key=lambda ann: ann.node_id)[allowance:]
        logger.debug("ignoring %d nodes of %r beyond its allowance of %d", len(excess), institution, allowance)
        dropped.update((institution, ann.node_id) for ann in excess)
    return [node for node in nodes if (node.institution, node.node_id) not in dropped]
