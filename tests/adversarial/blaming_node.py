"""`python -m tests.adversarial.blaming_node node start …`: Coop's own node, blaming its next hop.

It runs every step it is sent, correctly, and then reports that its push to the next node failed,
as a node would whose next hop is dead: a claim against the next hop, which is alive. Before this
defence the coordinator suspected the next hop and kept it out of every route for 30 s. So that
routes try it first, it also claims 1e12 tokens/s, as `lying_node` does.
"""

from __future__ import annotations

from coop.errors import PeerError
from coop.node import daemon
from coop.node.step_runner import StepRunner
from coop.wire.generated import coop_pb2 as pb
from tests.adversarial.lying_node import claimed_estimate, claimed_throughput


async def blaming_push(
    runner: StepRunner, next_hops: list[pb.Hop], step: pb.StepRequest, hidden: pb.Tensor, sketches: list[pb.Sketch]
) -> None:
    raise PeerError(f"next node {next_hops[0].endpoint} is unreachable: UNAVAILABLE")


if __name__ == "__main__":
    from coop.cli import app

    StepRunner._push = blaming_push  # type: ignore[method-assign]
    daemon.measure_throughput = claimed_throughput
    daemon.estimate_throughput = claimed_estimate
    app(prog_name="coop")
