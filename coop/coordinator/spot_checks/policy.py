"""What share of sessions the spot checks re-compute, and how close a replica must come."""

from __future__ import annotations

from dataclasses import dataclass

from coop.config import CoordinatorSettings

# checks in flight that one institution's new nodes may cause (minting node ids buys no more)
NEW_NODE_CHECKS_PER_INSTITUTION = 4


@dataclass(frozen=True)
class SpotCheckPolicy:
    rate: float  # share of sessions checked
    new_node_rate: float  # the share when a node of the route has little history
    history_steps: int  # passed checked steps below which a node is new
    tolerance: float  # per token: |claimed - recomputed| / |what the hop added|
    sketch_dims: int
    new_node_checks_per_institution: int = NEW_NODE_CHECKS_PER_INSTITUTION

    @classmethod
    def from_settings(cls, settings: CoordinatorSettings) -> SpotCheckPolicy:
        return cls(
            settings.spot_check_rate,
            settings.spot_check_new_node_rate,
            settings.spot_check_history_steps,
            settings.spot_check_tolerance,
            settings.sketch_dims,
        )

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or self.new_node_rate > 0
