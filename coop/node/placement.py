"""Where a node starts: which of its models, and which of that model's blocks.

`--blocks A:B` names the blocks of the first model; `--blocks auto` takes the window, of any of the
node's models, where the pool needs the node most (coop/swarm/rebalance.py), as the swarm shows it.
"""

from __future__ import annotations

from collections.abc import Callable

from coop.config import NodeSettings
from coop.errors import InvalidInput
from coop.model.manifest import Manifest
from coop.node.rebalancing import ListNodes, ServableModel
from coop.swarm.rebalance import Candidate, Placement, decide

Estimate = Callable[[Manifest, int, int, str], float]  # (manifest, start, end, device type) -> tokens/s


def parse_blocks(text: str, num_blocks: int) -> tuple[int, int] | None:
    """'A:B' -> (A, B); 'auto' -> None."""
    if text == "auto":
        return None
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError as exc:
        raise InvalidInput(f"--blocks must be START:END or auto, got {text!r}") from exc
    if not 0 <= start < end <= num_blocks:
        raise InvalidInput(f"--blocks {text} does not fit the model's blocks 0:{num_blocks}")
    return start, end


def servable_models(settings: NodeSettings) -> dict[str, ServableModel]:
    """The node's models by content hash, each with how many of its blocks the node can hold."""
    models: dict[str, ServableModel] = {}
    for directory in (settings.model_dir, *settings.more_model_dirs):
        manifest = Manifest.load(directory)
        if manifest.content_hash in models:
            raise InvalidInput(f"{directory} is the same model as {models[manifest.content_hash].directory}")
        length = settings.max_blocks or max(1, settings.memory_budget_bytes // manifest.largest_block_bytes)
        models[manifest.content_hash] = ServableModel(directory, manifest, min(length, manifest.num_blocks))
    return models


def pick_placement(
    settings: NodeSettings, models: dict[str, ServableModel], list_nodes: ListNodes, node_id: str, estimate: Estimate
) -> Placement:
    """--blocks A:B of the first model, or (auto) the window of any model where the pool needs this node most."""
    first = next(iter(models.values()))
    explicit = parse_blocks(settings.blocks, first.manifest.num_blocks)
    if explicit is not None:
        return Placement(first.manifest.content_hash, *explicit)
    from coop.model.loading import resolve_device  # imports transformers: only once the DHT process is forked

    device_type = resolve_device(settings.device).type
    mine = [
        Candidate(h, m.manifest.num_blocks, m.length, estimate(m.manifest, 0, m.length, device_type))
        for h, m in models.items()
    ]
    placement = decide(node_id, None, mine, {h: list_nodes(h) for h in models})
    assert placement is not None  # decide always places a node that has no placement yet
    return placement
