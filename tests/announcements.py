"""Node announcements for pure tests of route and span choice: plain records, valid for 10 s, unsigned."""

from __future__ import annotations

import time

from coop.swarm.announcement import NodeAnnouncement


def node(node_id: str, start: int, end: int, tps: float = 10.0, institution: str = "i") -> NodeAnnouncement:
    now = time.time()
    return NodeAnnouncement(
        node_id=node_id,
        pool_id="p",
        model_hash="m",
        start=start,
        end=end,
        endpoint=f"127.0.0.1:{5000 + start}",
        institution=institution,
        throughput_tps=tps,
        free_cache_bytes=1,
        announced_at=now,
        expires_at=now + 10,
    )
