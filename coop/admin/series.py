"""Pure shaping of raw samples and ledger sums into the series the charts draw."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from coop.admin.queries import BUCKET_SECONDS, Bucket, FlowBucket, bucket_start
from coop.ledger.models import flops_to_credits

RATE_STEP_S = 10.0


def token_rate(
    samples: Iterable[tuple[float, float]], *, now_s: float, window_s: float, step_s: float = RATE_STEP_S
) -> list[tuple[float, float]]:
    """(seconds ago, tokens/s) per step of the last window_s, newest last; every step is present."""
    steps = max(1, round(window_s / step_s))
    totals = [0.0] * steps
    for at_s, tokens in samples:
        index = int((now_s - at_s) // step_s)
        if 0 <= index < steps:
            totals[index] += tokens
    return [(index * step_s, totals[index] / step_s) for index in reversed(range(steps))]


def recent_rate(samples: Iterable[tuple[float, float]], *, now_s: float, span_s: float = 60.0) -> float:
    """Mean tokens/s over the last span_s."""
    return sum(tokens for at_s, tokens in samples if now_s - span_s < at_s <= now_s) / span_s


def flow_series(
    flows: Sequence[FlowBucket], *, institution: str, bucket: Bucket, end: dt.datetime, count: int
) -> list[tuple[dt.datetime, float, float]]:
    """(bucket start, credits contributed, credits used) for the `count` buckets up to `end`, gaps as zeros."""
    last = bucket_start(end, bucket)
    starts = [last - dt.timedelta(seconds=BUCKET_SECONDS[bucket] * i) for i in reversed(range(count))]
    sums = {s: [0.0, 0.0] for s in starts}
    for flow in flows:
        if flow.institution == institution and flow.start in sums:
            sums[flow.start][0] += flops_to_credits(flow.contributed_flops)
            sums[flow.start][1] += flops_to_credits(flow.used_flops)
    return [(s, sums[s][0], sums[s][1]) for s in starts]


def flow_window(bucket: Bucket, now: dt.datetime) -> tuple[int, dt.datetime]:
    """(how many buckets, start of the first) a chart shows: two days of hours, or a month of days."""
    count = 48 if bucket == "hour" else 30
    return count, bucket_start(now, bucket) - dt.timedelta(seconds=BUCKET_SECONDS[bucket] * (count - 1))
