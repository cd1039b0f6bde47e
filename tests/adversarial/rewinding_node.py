"""`python -m tests.adversarial.rewinding_node node start …`: Coop's own node, rewinding its next hop.

It runs every step it is sent, correctly, and pushes each onward marked as a rewind the coordinator
never asked for, carrying a replayed coordinator signature (the step's route signature: genuine, but
over another payload). Before this defence the next hop dropped its cache back and recomputed the
session unpaid, and was blamed for the slow answers. So that routes try it first, it also claims
1e12 tokens/s, as `lying_node` does.
"""

from __future__ import annotations

from coop.node import daemon
from coop.node.step_runner import StepRunner
from coop.wire.generated import coop_pb2 as pb
from tests.adversarial.lying_node import claimed_estimate, claimed_throughput

_honest_push = StepRunner._push


async def rewinding_push(
    runner: StepRunner, next_hops: list[pb.Hop], step: pb.StepRequest, hidden: pb.Tensor, sketches: list[pb.Sketch]
) -> None:
    forged = pb.StepRequest()
    forged.CopyFrom(step)
    forged.rewind = True
    forged.rewind_signature = step.route_signature  # the coordinator's, replayed
    await _honest_push(runner, next_hops, forged, hidden, sketches)


if __name__ == "__main__":
    from coop.cli import app

    StepRunner._push = rewinding_push  # type: ignore[method-assign]
    daemon.measure_throughput = claimed_throughput
    daemon.estimate_throughput = claimed_estimate
    app(prog_name="coop")
