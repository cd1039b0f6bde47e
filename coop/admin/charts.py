"""Charts as SVG text, rendered on the server: no script, no external resource, readable when printed.

Pure functions from plain values to a string. Every piece of text is escaped here, so the result
can be embedded in a page as is. Colours are presentation attributes (the pages' CSP allows no
inline styles); sizes are in viewBox units and the stylesheet scales the SVG to its container.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from coop.swarm.node_key import NodeKey

WIDTH = 960
CONTRIBUTED = "#177e89"  # teal: what an institution's nodes delivered
USED = "#e07a1f"  # orange: what its requests consumed
SERVED = "#2f5fd0"  # blue: a node's span
GAP = "#d1343a"  # red: blocks nobody serves
AXIS = "#8a8f98"
INK = "#1f2430"


def _text(x: float, y: float, text: str, *, anchor: str = "start", size: int = 12, fill: str = INK) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}">{escape(text)}</text>'
    )


def _svg(height: float, label: str, body: list[str], css_class: str, width: float = WIDTH) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart {css_class}" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'role="img" aria-label="{escape(label)}"><title>{escape(label)}</title>{"".join(body)}</svg>'
    )


def _clip(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least value (axis tops)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value * (1 - 1e-9):
            return float(step * power)
    return float(10 * power)


def format_amount(value: float) -> str:
    """Compact numbers for axis labels: 950, 1.2k, 3.4M."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


# ------------------------------------------------------------------------------------------ coverage map


@dataclass(frozen=True)
class CoverageRow:
    """One node: the blocks [start, end) it serves, shaded from 0 (idle/slow) to 1 (busiest/fastest)."""

    node_id: str
    institution: str
    start: int
    end: int
    shade: float
    note: str  # shown at the row's end and in its tooltip, e.g. "3 sessions, 41 tok/s"
    serving: bool = True  # False: paused, draining or quarantined: drawn, but its blocks do not count as served


def coverage_map(num_blocks: int, rows: Sequence[CoverageRow], *, shaded_by: str, model: str = "") -> str:
    """Blocks 0..num_blocks-1 across, one row per node; the top row counts the nodes serving each block.
    `model`: the model's name, in the title, where a coordinator serves several (one map each)."""
    label_w, note_w, row_h, top = 230, 130, 22, 44
    grid_w = WIDTH - label_w - note_w
    cell = grid_w / max(num_blocks, 1)
    height = top + row_h * (len(rows) + 1) + 26
    title = f"{model}: coverage" if model else "Coverage"
    body = [_text(0, 16, f"{title} of blocks 0..{num_blocks - 1} (shade: {shaded_by})", size=13)]
    tick = max(1, math.ceil(num_blocks / 16))
    for block in range(0, num_blocks, tick):
        body.append(_text(label_w + (block + 0.5) * cell, top - 6, str(block), anchor="middle", size=10, fill=AXIS))

    counts = [0] * num_blocks
    for row in rows:
        for block in range(max(row.start, 0), min(row.end, num_blocks) if row.serving else 0):
            counts[block] += 1
    y = top
    body.append(_text(label_w - 8, y + 15, "nodes per block", anchor="end", size=11))
    for block, count in enumerate(counts):
        fill, opacity = (GAP, 1.0) if count == 0 else (SERVED, min(1.0, 0.35 + 0.25 * count))
        tooltip = f"block {block}: " + ("not served" if count == 0 else f"{count} node{'s' * (count != 1)}")
        body.append(
            f'<rect class="block{" gap" if count == 0 else ""}" x="{label_w + block * cell:.2f}" y="{y + 2}" '
            f'width="{max(cell - 1, 0.5):.2f}" height="{row_h - 4}" fill="{fill}" fill-opacity="{opacity:.2f}">'
            f"<title>{escape(tooltip)}</title></rect>"
        )
    for row in rows:
        y += row_h
        start, end = max(row.start, 0), min(row.end, num_blocks)
        opacity = 0.2 + 0.8 * min(max(row.shade, 0.0), 1.0) if row.serving else 0.1
        tooltip = f"{row.node_id} ({row.institution}): blocks {row.start}..{row.end - 1}; {row.note}"
        body.append(_text(label_w - 8, y + 15, _clip(f"{row.node_id} · {row.institution}", 34), anchor="end", size=11))
        body.append(
            f'<rect x="{label_w}" y="{y + 2}" width="{grid_w:.2f}" height="{row_h - 4}" '
            f'fill="{AXIS}" fill-opacity="0.08"/>'
        )
        if end > start:
            key = escape(str(NodeKey(row.institution, row.node_id)))
            body.append(
                f'<rect class="span" data-node="{key}" x="{label_w + start * cell:.2f}" y="{y + 2}" '
                f'width="{max((end - start) * cell - 1, 0.5):.2f}" height="{row_h - 4}" fill="{SERVED}" '
                f'fill-opacity="{opacity:.2f}"><title>{escape(tooltip)}</title></rect>'
            )
        body.append(_text(label_w + grid_w + 8, y + 15, _clip(row.note, 20), size=11, fill=AXIS))
    if not rows:
        body.append(_text(label_w + grid_w / 2, y + row_h + 15, "no node is online", anchor="middle", fill=GAP))
    gaps = counts.count(0)
    summary = "every block is served" if gaps == 0 else f"{gaps} of {num_blocks} blocks not served"
    body.append(_text(label_w, height - 6, summary, size=11, fill=GAP if gaps else AXIS))
    return _svg(height, f"Coverage map: {summary}", body, "coverage")


# ---------------------------------------------------------------------------------------- rate over time


def rate_chart(points: Sequence[tuple[float, float]], *, window_s: float, unit: str = "tokens/s") -> str:
    """A line of (seconds ago, value) pairs over the last window_s; the newest point is at the right."""
    left, right, top, bottom, height = 60, 16, 16, 28, 180
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    peak = nice_ceiling(max((v for _, v in points), default=0.0))
    body = [
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="{AXIS}"/>',
        _text(left - 6, top + 10, format_amount(peak), anchor="end", size=11, fill=AXIS),
        _text(left - 6, top + plot_h, "0", anchor="end", size=11, fill=AXIS),
        _text(left, height - 6, f"{window_s / 60:.0f} min ago", size=11, fill=AXIS),
        _text(left + plot_w, height - 6, "now", anchor="end", size=11, fill=AXIS),
    ]

    def xy(ago_s: float, value: float) -> str:
        x = left + plot_w * (1 - min(max(ago_s, 0.0), window_s) / window_s)
        return f"{x:.1f},{top + plot_h * (1 - value / peak):.1f}"

    ordered = sorted(points, key=lambda p: -p[0])
    if ordered:
        line = " ".join(xy(ago, value) for ago, value in ordered)
        base = f"{xy(ordered[-1][0], 0)} {xy(ordered[0][0], 0)}"
        body.append(f'<polygon points="{line} {base}" fill="{SERVED}" fill-opacity="0.15"/>')
        body.append(f'<polyline points="{line}" fill="none" stroke="{SERVED}" stroke-width="2"/>')
    else:
        body.append(_text(left + plot_w / 2, top + plot_h / 2, "no samples yet", anchor="middle", fill=AXIS))
    latest = ordered[-1][1] if ordered else 0.0
    return _svg(height, f"{unit} over the last {window_s / 60:.0f} minutes; now {latest:.1f}", body, "rate")


# ------------------------------------------------------------------------------ contribution versus usage


def flow_chart(
    buckets: Sequence[tuple[dt.datetime, float, float]], *, bucket: str, title: str, width: float = WIDTH
) -> str:
    """Paired bars per bucket: credits contributed (teal) and used (orange). A narrow `width` reads larger."""
    left, right, top, bottom, height = 60, 16, 30, 30, 220
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = nice_ceiling(max((max(c, u) for _, c, u in buckets), default=0.0))
    slot = plot_w / max(len(buckets), 1)
    bar = max(slot * 0.4, 0.5)
    body = [
        _text(0, 16, title, size=13),
        f'<rect x="{width - 200}" y="6" width="10" height="10" fill="{CONTRIBUTED}"/>',
        _text(width - 186, 15, "contributed", size=11),
        f'<rect x="{width - 105}" y="6" width="10" height="10" fill="{USED}"/>',
        _text(width - 91, 15, "used", size=11),
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="{AXIS}"/>',
        _text(left - 6, top + 10, format_amount(peak), anchor="end", size=11, fill=AXIS),
        _text(left - 6, top + plot_h, "0", anchor="end", size=11, fill=AXIS),
    ]
    label_every = max(1, math.ceil(len(buckets) / max(2, int(width / 120))))
    fmt = "%m-%d %H:00" if bucket == "hour" else "%Y-%m-%d"
    for index, (start, contributed, used) in enumerate(buckets):
        x = left + index * slot + (slot - 2 * bar) / 2
        for offset, value, colour, what in ((0.0, contributed, CONTRIBUTED, "contributed"), (bar, used, USED, "used")):
            h = plot_h * value / peak
            body.append(
                f'<rect x="{x + offset:.2f}" y="{top + plot_h - h:.2f}" width="{bar:.2f}" height="{h:.2f}" '
                f'fill="{colour}"><title>{escape(f"{start:{fmt}}: {value:.3g} credits {what}")}</title></rect>'
            )
        if index % label_every == 0:
            body.append(_text(left + (index + 0.5) * slot, height - 8, f"{start:{fmt}}", anchor="middle", size=10))
    if not any(c or u for _, c, u in buckets):
        body.append(
            _text(left + plot_w / 2, top + plot_h / 2, "no receipts in this period", anchor="middle", fill=AXIS)
        )
    return _svg(height, title, body, "flows", width)
