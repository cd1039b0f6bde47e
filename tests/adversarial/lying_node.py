"""`python -m tests.adversarial.lying_node node start …`: Coop's own node, claiming 1e12 tokens/s.

The attacker changes two things in the real code: instead of measuring its span, the node claims
`CLAIMED_TPS` in its announcement (and its Info answers); and it is in fact slower than honest
nodes, waiting `DAWDLE_S` before each step, as a weak machine that lies would be. It loads, serves
and computes correctly, so the only lie is the one routing must not believe.
"""

from __future__ import annotations

import time

import torch

from coop.model.engine import SpanEngine
from coop.node import daemon

CLAIMED_TPS = 1e12
DAWDLE_S = 0.25

_honest_step = SpanEngine.step


def claimed_throughput(engine: SpanEngine) -> float:
    return CLAIMED_TPS


def claimed_estimate(*_: object) -> float:
    return CLAIMED_TPS


def dawdling_step(
    engine: SpanEngine, session_id: str, hidden: torch.Tensor, start_position: int, **options: bool
) -> torch.Tensor:
    time.sleep(DAWDLE_S)
    return _honest_step(engine, session_id, hidden, start_position, **options)


if __name__ == "__main__":
    from coop.cli import app

    daemon.measure_throughput = claimed_throughput
    daemon.estimate_throughput = claimed_estimate
    SpanEngine.step = dawdling_step  # type: ignore[method-assign, assignment]
    app(prog_name="coop")
