"""`COOP_CHEAT=KIND python -m tests.adversarial.cheating_node node start …`: Coop's node, computing wrong.

The attacker runs the real node and changes only what its span returns (it still runs its blocks,
so its KV cache stays consistent and nothing but the values betrays it). Its sketches are computed
by the real code from what it pushes, so they are consistent with its lie: only a re-computation
can catch it. It wants routes, so it also claims the lying node's speed (`lying_node`), which routing caps
at the fastest node measured. KIND is one of:
- noise: adds Gaussian noise of 1% of each token's activation norm;
- skip: returns its input, as if it had no blocks;
- other_model: returns another model's activations (a random linear model of the same norm);
- sometimes: adds the noise on 10% of steps only;
- last_hop: adds the noise only when it is the last hop of the route (its output goes to the coordinator).
"""

from __future__ import annotations

import os
import random

import torch

from coop.model.engine import SpanEngine
from coop.node import daemon
from coop.node.route_checks import RouteChecks
from tests.adversarial.lying_node import claimed_estimate, claimed_throughput

CHEATS = ("noise", "skip", "other_model", "sometimes", "last_hop")
NOISE_SHARE = 0.01
SOMETIMES_SHARE = 0.1

_honest_step = SpanEngine.step
_honest_hops_after = RouteChecks.hops_after
_last_hop: dict[str, bool] = {}  # session id -> whether this node is the last hop of its route
_rng = random.Random()


def _noisy(output: torch.Tensor) -> torch.Tensor:
    noise = torch.randn_like(output.float())
    noise = noise / noise.norm(dim=-1, keepdim=True) * output.float().norm(dim=-1, keepdim=True) * NOISE_SHARE
    return (output.float() + noise).to(output.dtype)


def _other_model(hidden: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    weight = torch.randn(hidden.shape[-1], hidden.shape[-1], generator=generator).to(hidden.device)
    other = hidden.float() @ weight
    other = other / other.norm(dim=-1, keepdim=True) * output.float().norm(dim=-1, keepdim=True)
    return other.to(output.dtype)


def tampered(kind: str, session_id: str, hidden: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    if kind == "noise" or (kind == "sometimes" and _rng.random() < SOMETIMES_SHARE):
        return _noisy(output)
    if kind == "last_hop" and _last_hop.get(session_id, False):
        return _noisy(output)
    if kind == "skip":
        return hidden.to(output.device, output.dtype)
    if kind == "other_model":
        return _other_model(hidden, output)
    return output


def cheating_step(
    engine: SpanEngine, session_id: str, hidden: torch.Tensor, start_position: int, **options: bool
) -> torch.Tensor:
    output = _honest_step(engine, session_id, hidden, start_position, **options)
    return tampered(os.environ["COOP_CHEAT"], session_id, hidden, output)


def recording_hops_after(routes: RouteChecks, request, caller, live):  # type: ignore[no-untyped-def]
    hops = _honest_hops_after(routes, request, caller, live)
    _last_hop[request.session_id] = not hops
    return hops


def tamper_with_the_node() -> None:
    """Change the real node's code in this process as the attacker does (`COOP_CHEAT` picks the lie)."""
    if os.environ.get("COOP_CHEAT") not in CHEATS:
        raise SystemExit(f"set COOP_CHEAT to one of {', '.join(CHEATS)}")
    daemon.measure_throughput = claimed_throughput
    daemon.estimate_throughput = claimed_estimate
    SpanEngine.step = cheating_step  # type: ignore[method-assign]
    RouteChecks.hops_after = recording_hops_after  # type: ignore[method-assign]


if __name__ == "__main__":
    from coop.cli import app

    tamper_with_the_node()
    app(prog_name="coop")
