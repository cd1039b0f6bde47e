"""The admin view's SVG charts and the series they draw: pure functions, no server."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

import pytest

from coop.admin.charts import CoverageRow, coverage_map, flow_chart, format_amount, nice_ceiling, rate_chart
from coop.admin.queries import FlowBucket, bucket_start
from coop.admin.series import flow_series, flow_window, recent_rate, token_rate

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = '<script>alert("x")</script> & co'


def parse(svg: str) -> ET.Element:
    """Well-formed XML or it raises: every text and attribute was escaped."""
    return ET.fromstring(svg)


def rects(root: ET.Element, css_class: str) -> list[ET.Element]:
    return [r for r in root.iter(f"{SVG}rect") if css_class in (r.get("class") or "").split()]


def test_coverage_map_draws_each_node_span_and_marks_the_blocks_nobody_serves() -> None:
    rows = [
        CoverageRow("n0", "alpha", 0, 4, 1.0, "2 sess"),
        CoverageRow("n1", "beta", 5, 10, 0.5, "0 sess"),
        CoverageRow("n0", "beta", 2, 6, 0.0, "1 sess"),  # beta's own n0: another node
    ]
    root = parse(coverage_map(10, rows, shaded_by="load"))
    spans = rects(root, "span")
    assert [s.get("data-node") for s in spans] == ["alpha/n0", "beta/n1", "beta/n0"]
    assert [float(s.get("fill-opacity", "")) for s in spans] == [1.0, 0.6, 0.2]
    gaps = rects(root, "gap")
    assert len(gaps) == 0, "blocks 0..9 are all served (n2 covers 4)"
    root = parse(coverage_map(10, rows[:2], shaded_by="load"))
    gaps = rects(root, "gap")
    assert [g.find(f"{SVG}title").text for g in gaps] == ["block 4: not served"]  # type: ignore[union-attr]
    assert "1 of 10 blocks not served" in (root.get("aria-label") or "")
    # the widths are proportional to the spans: 4 blocks and 5 blocks
    widths = [float(s.get("width", "")) for s in rects(root, "span")]
    assert widths[1] / widths[0] == pytest.approx(5 / 4, rel=0.02)


def test_coverage_map_escapes_names_and_handles_an_empty_swarm() -> None:
    svg = coverage_map(4, [CoverageRow("n0", HOSTILE, 0, 4, 2.0, HOSTILE)], shaded_by="throughput")
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    root = parse(svg)
    assert float(rects(root, "span")[0].get("fill-opacity", "")) == 1.0, "shade is clamped to [0, 1]"
    empty = parse(coverage_map(4, [], shaded_by="throughput"))
    assert len(rects(empty, "gap")) == 4
    assert any(t.text == "no node is online" for t in empty.iter(f"{SVG}text"))


def test_rate_chart_scales_to_a_round_peak_and_says_when_it_has_no_samples() -> None:
    root = parse(rate_chart([(20.0, 13.0), (10.0, 37.0), (0.0, 21.0)], window_s=60))
    points = next(root.iter(f"{SVG}polyline")).get("points", "").split()
    assert len(points) == 3
    xs = [float(p.split(",")[0]) for p in points]
    assert xs == sorted(xs), "oldest on the left"
    assert any(t.text == "50" for t in root.iter(f"{SVG}text")), "axis top is the nice ceiling of 37"
    assert "now 21.0" in (root.get("aria-label") or "")
    empty = parse(rate_chart([], window_s=900))
    assert any(t.text == "no samples yet" for t in empty.iter(f"{SVG}text"))


def test_flow_chart_pairs_a_bar_per_bucket_and_side() -> None:
    start = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
    buckets = [(start + dt.timedelta(hours=h), float(h), 2.0 * h) for h in range(6)]
    root = parse(flow_chart(buckets, bucket="hour", title=HOSTILE))
    bars = [r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert len(bars) == 12
    heights = [float(r.get("height", "")) for r in bars]
    assert heights[-1] == max(heights) and heights[0] == 0.0
    assert root.find(f"{SVG}title").text == HOSTILE  # type: ignore[union-attr]
    quiet = parse(flow_chart([(start, 0.0, 0.0)], bucket="day", title="t"))
    assert any(t.text == "no receipts in this period" for t in quiet.iter(f"{SVG}text"))


@pytest.mark.parametrize(
    ("value", "ceiling"), [(0, 1), (0.3, 0.5), (1, 1), (1.01, 2), (37, 50), (120, 200), (501, 1000)]
)
def test_nice_ceiling(value: float, ceiling: float) -> None:
    assert nice_ceiling(value) == pytest.approx(ceiling)


def test_format_amount() -> None:
    assert [format_amount(v) for v in (0, 950, 1200, 3_400_000, 2e9)] == ["0", "950", "1.2k", "3.4M", "2G"]


# --------------------------------------------------------------------------------------------- series


def test_token_rate_buckets_samples_into_steps_of_the_window() -> None:
    now = 1000.0
    samples = [(now - 1, 30), (now - 5, 20), (now - 15, 100), (now - 59, 10), (now - 61, 999), (now + 5, 999)]
    rate = token_rate(samples, now_s=now, window_s=60, step_s=10)
    assert [ago for ago, _ in rate] == [50, 40, 30, 20, 10, 0]
    assert dict(rate) == {50: 1.0, 40: 0.0, 30: 0.0, 20: 0.0, 10: 10.0, 0: 5.0}
    assert recent_rate(samples, now_s=now, span_s=60) == pytest.approx(160 / 60)


def test_flow_series_fills_missing_buckets_with_zeros() -> None:
    end = dt.datetime(2025, 3, 2, 10, 30, tzinfo=dt.UTC)
    hour = bucket_start(end, "hour")
    flows = [
        FlowBucket(hour, "a", 3 * 10**12, 10**12),
        FlowBucket(hour - dt.timedelta(hours=2), "a", 0, 5 * 10**12),
        FlowBucket(hour, "b", 7 * 10**12, 0),
        FlowBucket(hour - dt.timedelta(hours=9), "a", 10**12, 0),  # outside the window
    ]
    series = flow_series(flows, institution="a", bucket="hour", end=end, count=3)
    assert series == [
        (hour - dt.timedelta(hours=2), 0.0, 5.0),
        (hour - dt.timedelta(hours=1), 0.0, 0.0),
        (hour, 3.0, 1.0),
    ]
    count, since = flow_window("day", end)
    assert count == 30 and since == dt.datetime(2025, 2, 1, tzinfo=dt.UTC)
