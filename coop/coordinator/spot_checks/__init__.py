"""Spot checks: re-compute a sample of sessions on other replicas and catch nodes that return wrong activations.

How it works (issue 13):
- Every session's route is opened with a fresh sketch seed (`coop.wire.sketches`), so on every step
  each node appends a sketch of the input it received and the output it pushed on, each projected
  by a matrix drawn from the seed and the digest of that tensor's wire bytes (which the sketch
  carries), and the last hop returns them all with its result. Checked or not, sessions look the
  same to a node.
- A sample of sessions is checked: `spot_check_rate`, or `spot_check_new_node_rate` when a node of
  the route has fewer than `spot_check_history_steps` passed checked steps; the choice is made at
  the first step, by the coordinator alone. A checked session's every step is re-computed, before
  its token is released, on a shadow: for each hop, a session over the same blocks on a replica
  route (other nodes, picked at random among those that serve them), driven by the coordinator hop
  by hop, so that it sees every activation. It then compares:
  1. what it sent with hop 0's input digest and sketch, and what it received with the last hop's
     output digest and sketch (a mismatch is a lie about the session's own ends: that hop is at fault);
  2. hop k's output digest and sketch with hop k+1's input digest and sketch (a mismatch: one pushed
     something other than it says, or the other lies about what it got; which one, nobody else saw:
     a dispute);
  3. hop k's output sketch with the shadow's, projected alike (by hop k's output digest), whose input
     equals hop k's once the hops before it passed: a change hop k hid from the projection it
     expected changes its bytes, so the projection, and shows here, on hop k, not on the next hop
     whose output it spoils. The distance is per token, relative to what the hop added to the
     residual stream (output minus input), and must stay under `spot_check_tolerance`. The first
     hop over it is the suspect. A third replica route, fed the hop's whole input so far, settles who is right; with
     none, it is a dispute.
- A node found at fault is quarantined: an audit event with the evidence (session, step, hop, node,
  distance) in the ledger, which is also the pool-wide list (`coop.swarm.trust`: every coordinator
  follows it, only coordinators and the admin write it), and no route uses it again; its observation
  of the session is withheld, so its receipt for it is never paid. A dispute is audited, withholds
  both sides' pay for the session and quarantines neither. Either way the session leaves the route
  for one without them, and its tokens are replayed there (`RemoteChain.route_around`): the client
  gets the single-process tokens. A proven fault takes the culprit's whole institution out of the
  session's routes (a member's other node ids are not tried in it), and costs the request no
  failover: a member running many cheating node ids cannot use up a session's `max_failovers`. A
  shadow found wrong by the referee is quarantined the same way (a lone replica node) or disputed (a
  replica route of several), and the session goes on.
- Replicas are metered like the session they check, to its consumer: a checked session costs it
  about twice its compute, an average of `spot_check_rate` more.
- Passed and failed checks per node are its trust record (admin view's nodes page, `coop status --pool`).
"""
