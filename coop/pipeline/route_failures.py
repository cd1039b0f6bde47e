"""What a session holds against the nodes it tried: failures it saw, refusals, and claims.

The institution is the unit of trust (DESIGN.md): a member can mint node ids, so every node here
is a `NodeKey` (institution, node id), and what one node reports is a claim, not proof.

- What the coordinator saw itself (a stream that broke, a call that failed, a probe unanswered)
  makes the node `dead`: it leaves the session and the swarm view suspects it.
- A capacity refusal (draining, paused, a cache or session limit) is no failure: the node is
  `refused`, routed around by this session and priced by its refusal rate, never suspected. Each
  refusal leaves this session a node it had not tried, and an institution whose nodes refused
  `REFUSALS_PER_INSTITUTION` times is left out of the session whole, so N made-up node ids cost a
  session at most that many opens, not its failover budget.
- A node that reports that it could not push onward blames its next hop. If a probe finds a hop
  dead, that hop is the culprit. If every hop answers, the claim is weighed by who makes it: a
  member's word about its own node stands (the blamed node is suspected); against another
  institution's node it only moves this session off the reporter, and counts as the reporter's
  refusal. The blamed node is suspected only once reporters of `CORROBORATING_INSTITUTIONS`
  institutions have blamed it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection

from coop.errors import CacheBudgetExceeded, NodeDraining, SessionLimitExceeded
from coop.swarm.node_key import NodeKey
from coop.swarm.routing import Hop

CAPACITY_REFUSALS = (NodeDraining, CacheBudgetExceeded, SessionLimitExceeded)
REFUSALS_PER_INSTITUTION = 2
CORROBORATING_INSTITUTIONS = 2


class HopsFailed(Exception):
    """The session must leave its route. `dead`: nodes the coordinator saw fail (left and suspected);
    `avoid`: nodes this session leaves, suspecting nobody; `refused`: nodes that declined the session
    (left, and counted in their refusal rate); `convicted`: nodes a spot check proved wrong (left with
    every node of their institution; the trust book has already booked the verdict)."""

    def __init__(
        self,
        reason: str,
        *,
        dead: Collection[NodeKey] = (),
        avoid: Collection[NodeKey] = (),
        refused: Collection[NodeKey] = (),
        convicted: Collection[NodeKey] = (),
    ) -> None:
        super().__init__(reason)
        self.dead = frozenset(dead)
        self.avoid = frozenset(avoid)
        self.refused = frozenset(refused)
        self.convicted = frozenset(convicted)


def is_capacity_refusal(error: BaseException | None) -> bool:
    return isinstance(error, CAPACITY_REFUSALS)


class SessionAvoidance:
    """The nodes and institutions one session routes around, and the claims it heard."""

    def __init__(self) -> None:
        self.excluded: set[NodeKey] = set()  # failed or avoided: in no route of this session
        # refused the session: in no route it opens, but a planned move trusts the swarm view
        # instead, which sees a resumed node serve again
        self.refusing: set[NodeKey] = set()
        self.refusing_institutions: set[str] = set()
        self.convicted_institutions: set[str] = set()  # a spot check convicted one of their nodes: in no route
        self._blamed_by: defaultdict[NodeKey, set[str]] = defaultdict(set)  # blamed node -> reporters' institutions

    @property
    def left_institutions(self) -> set[str]:
        """Institutions none of whose nodes this session opens on."""
        return self.refusing_institutions | self.convicted_institutions

    def counts(self, failure: HopsFailed) -> bool:
        """Whether leaving a route for `failure` uses up a failover. Refusals do not (nothing ran), nor does
        a conviction of an institution the session had not left: the bound on those is the institutions.
        One it had left can only come back through a route that ignored this avoidance: that counts."""
        convicted_again = {key.institution for key in failure.convicted} & self.convicted_institutions
        return bool(failure.dead or failure.avoid or convicted_again)

    def record(self, failure: HopsFailed) -> None:
        self.excluded |= failure.dead | failure.avoid | failure.convicted
        self.convicted_institutions |= {key.institution for key in failure.convicted}
        self.refusing |= failure.refused
        refusals: defaultdict[str, int] = defaultdict(int)
        for institution, _node_id in self.refusing:
            refusals[institution] += 1
        self.refusing_institutions |= {i for i, n in refusals.items() if n >= REFUSALS_PER_INSTITUTION}

    def claim(self, reporter: Hop, blamed: Hop, reason: str) -> HopsFailed:
        """`reporter` says its push to `blamed` failed, and both answer a probe: what the session does."""
        if reporter.institution == blamed.institution:
            return HopsFailed(reason, dead={blamed.key})
        self._blamed_by[blamed.key].add(reporter.institution)
        if len(self._blamed_by[blamed.key]) >= CORROBORATING_INSTITUTIONS:
            return HopsFailed(reason, dead={blamed.key}, avoid={reporter.key})
        return HopsFailed(
            f"{reason} (a claim against node {blamed.node_id} of {blamed.institution})",
            avoid={reporter.key},
            refused={reporter.key},
        )
