"""Which CPU weight layout a process runs, stock dense or oneDNN-packed, chosen by timing both here.

Why measure: packing (coop.model.packed_linear) made a 2-core laptop-class CPU's batched matmuls several
times faster, but on a Xeon with AVX-512/AMX, torch's stock float32 Linear beat it (local generate()
7.5 against 9.9 tokens/s at 1 thread). Neither is right everywhere, so at load each process times both on
its own model's Linear shapes (one module per distinct shape, a wide LM head on a slice), for one row and
for the most rows a batch will hold, and packs when the packed/stock time ratios, multiplied over those
row counts, are clearly below 1 (PACKED_MARGIN). Each layout's fastest of a few alternating calls is what
counts, so a busy machine slows both alike. It costs well under a second (~0.3 s for the demo model's
blocks or its head, on 1 busy core), and the answer is kept per process for the same shapes, threads and
rows, so every load in one process agrees.

Exactness: the two layouts sum in another order (logits move by ~1e-5), so a greedy comparison between
processes that chose differently can only break at a near-tie; comparisons use the demo model (real
weights, no near-ties) or force one layout (the `cpu_weight_layout` setting, or `layout=` here).
Quantized weights, other dtypes and other devices are never packed: their layout is what they are.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

import torch
from torch import nn

from coop.model.packed_linear import PackedLinear, pack_linears, packable_linears

log = logging.getLogger(__name__)

LayoutSetting = Literal["auto", "stock", "packed"]
LAYOUT_SETTINGS: tuple[str, ...] = get_args(LayoutSetting)
# The most rows a batched step or head call holds by default (a node's max_batch_steps decode rows).
DEFAULT_BATCH_ROWS = 16
WARMUP_CALLS = 2
TIMED_CALLS = 7
# Packed is kept only when clearly faster: a near-tie keeps the stock layout, so that processes on one machine,
# whose timings differ by noise, still choose alike (and a near-tie costs little either way).
PACKED_MARGIN = 0.9
# A wider Linear (an LM head of 49152 outputs) is timed on its first this many outputs.
PROBE_MAX_OUT = 4096


@dataclass(frozen=True)
class LayoutChoice:
    """The layout a model's Linear weights run in, and why: `how` is "measured", "set" (forced by the
    setting) or "fixed" (nothing packable: a GPU, another dtype, quantized weights; or built as it is)."""

    layout: Literal["stock", "packed"]
    how: Literal["measured", "set", "fixed"]
    # rows -> packed seconds / stock seconds, over the representative shapes (measured only)
    packed_over_stock: dict[int, float] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for logs and `coop node status`, e.g. 'stock (measured: packed/stock 1.31x at 1 row, ...)'."""
        if not self.packed_over_stock:
            return f"{self.layout} ({self.how})"
        ratios = ", ".join(f"{r:.2f}x at {rows} row{'s' * (rows > 1)}" for rows, r in self.packed_over_stock.items())
        return f"{self.layout} ({self.how}: packed/stock {ratios})"


def check_layout_setting(setting: str) -> LayoutSetting:
    if setting not in LAYOUT_SETTINGS:
        raise ValueError(f"unknown CPU weight layout {setting!r}; choose one of {', '.join(LAYOUT_SETTINGS)}")
    return cast(LayoutSetting, setting)


def apply_weight_layout(
    model: nn.Module, setting: str = "auto", *, batch_rows: int = DEFAULT_BATCH_ROWS, what: str = "model"
) -> LayoutChoice:
    """Choose the layout of `model`'s Linear weights (`setting`: auto, stock or packed), pack them if it is
    packed, log the choice and return it."""
    choice = choose_layout(model, check_layout_setting(setting), batch_rows)
    if choice.layout == "packed":
        pack_linears(model)
    log.info("CPU weight layout of the %s: %s", what, choice.describe(), extra={"weight_layout": choice.layout})
    return choice


def choose_layout(model: nn.Module, setting: LayoutSetting, batch_rows: int) -> LayoutChoice:
    linears = packable_linears(model)
    if not linears:
        return LayoutChoice(layout_of(model), "fixed")
    if setting != "auto":
        return LayoutChoice(setting, "set")
    by_shape = {(m.in_features, m.out_features): m for m in linears}
    shapes = tuple(sorted(by_shape))
    ratios = _measured_ratios(shapes, tuple(sorted({1, max(1, batch_rows)})), torch.get_num_threads(), by_shape)
    product = 1.0
    for ratio in ratios.values():
        product *= ratio
    return LayoutChoice("packed" if product < PACKED_MARGIN else "stock", "measured", ratios)


def layout_of(model: nn.Module) -> Literal["stock", "packed"]:
    """The layout `model` runs in now: packed if any of its Linear layers is."""
    return "packed" if any(isinstance(m, PackedLinear) for m in model.modules()) else "stock"


# (shapes, rows, torch threads) -> ratios: what makes every load in one process choose alike.
_MEASURED: dict[tuple[tuple[tuple[int, int], ...], tuple[int, ...], int], dict[int, float]] = {}


def _measured_ratios(
    shapes: tuple[tuple[int, int], ...], rows: tuple[int, ...], threads: int, by_shape: dict[tuple[int, int], nn.Linear]
) -> dict[int, float]:
    """rows -> packed / stock seconds over one Linear of each shape, measured once per process and key."""
    key = (shapes, rows, threads)
    if key not in _MEASURED:
        probes = [_probe(by_shape[s]) for s in shapes]
        layouts = [(probe, PackedLinear(probe)) for probe in probes]
        with torch.inference_mode():
            _MEASURED[key] = {n: _fastest_ratio(layouts, n) for n in rows}
    return dict(_MEASURED[key])


def _probe(linear: nn.Linear) -> nn.Linear:
    """`linear`, or a slice of its first PROBE_MAX_OUT outputs: a wide LM head times the same per output."""
    out = min(linear.out_features, PROBE_MAX_OUT)
    probe = nn.Linear(linear.in_features, out, bias=linear.bias is not None, device="meta")
    probe.weight = nn.Parameter(linear.weight.detach()[:out].contiguous(), requires_grad=False)
    if linear.bias is not None:
        probe.bias = nn.Parameter(linear.bias.detach()[:out].contiguous(), requires_grad=False)
    return probe


def _fastest_ratio(layouts: list[tuple[nn.Linear, PackedLinear]], rows: int) -> float:
    """Packed / stock: each layout's fastest call of each shape on `rows` rows, summed over the shapes.

    The calls alternate between the layouts and the fastest is kept, so a busy machine (other processes
    taking the cores for a while) slows both alike, or neither."""
    best = {"stock": 0.0, "packed": 0.0}
    for stock, packed in layouts:
        x = torch.randn(rows, stock.in_features)
        for module in (stock, packed) * WARMUP_CALLS:
            module(x)
        fastest = {"stock": float("inf"), "packed": float("inf")}
        for _ in range(TIMED_CALLS):
            for name, module in (("stock", stock), ("packed", packed)):
                began = time.perf_counter()
                module(x)
                fastest[name] = min(fastest[name], time.perf_counter() - began)
        best = {name: best[name] + fastest[name] for name in best}
    return best["packed"] / best["stock"]
