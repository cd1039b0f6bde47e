"""CPU Linear layers packed once for oneDNN: same outputs, same bytes, every loader, nothing else touched; and
the layout each process runs, measured (auto) or forced."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine
from coop.model.loading import load_full_model
from coop.model.manifest import Manifest
from coop.model.packed_linear import PackedLinear, pack_linears
from coop.model.skeleton import decoder_layers
from coop.model.weight_layout import apply_weight_layout, check_layout_setting, choose_layout, layout_of


def test_a_packed_linear_computes_what_the_dense_one_does() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(64, 96)
    packed = PackedLinear(dense)
    for rows in (1, 3, 8, 40):
        x = torch.randn(2, rows, 64)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), dense(x), atol=1e-5, rtol=1e-5)


def test_only_plain_float32_cpu_linears_are_packed() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4)), nn.Linear(8, 8).to(torch.bfloat16))
    assert pack_linears(model) == 2
    assert [type(m).__name__ for m in model.modules() if not isinstance(m, nn.Sequential)] == [
        "PackedLinear",
        "PackedLinear",
        "Linear",
    ]
    assert pack_linears(model) == 0  # packing twice changes nothing


def test_every_loader_packs_when_told_and_the_reference_run_matches_the_stock_model(tiny_llama_dir: str) -> None:
    directory = Path(tiny_llama_dir)
    manifest = Manifest.load(directory)
    engine = SpanEngine.load(directory, 0, manifest.num_blocks, device="cpu", weight_layout="packed")
    assert engine.weight_layout.describe() == "packed (set)"
    block = decoder_layers(engine._model, manifest.num_blocks)[0]
    assert not any(type(m) is nn.Linear for m in block.modules())
    assert any(isinstance(m, PackedLinear) for m in block.modules())

    client = ClientPart.load(directory, device="cpu", weight_layout="packed")
    assert isinstance(client.model.get_output_embeddings(), PackedLinear)
    assert type(client.model.get_input_embeddings().weight) is nn.Parameter  # the tied embedding keeps its weight

    stock = load_full_model(directory, manifest, torch.device("cpu"), layout="stock")
    packed = load_full_model(directory, manifest, torch.device("cpu"), layout="packed")
    assert (layout_of(stock), layout_of(packed)) == ("stock", "packed")
    ids = torch.tensor([[5, 17, 42, 8, 91, 3, 60]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids).logits, stock(ids).logits, atol=1e-4, rtol=1e-4)
        stock_tokens = stock.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(packed.generate(ids, max_new_tokens=8, do_sample=False), stock_tokens)


def test_a_packed_span_counts_the_same_weight_bytes(tiny_llama_dir: str) -> None:
    directory = Path(tiny_llama_dir)
    manifest = Manifest.load(directory)
    engine = SpanEngine.load(directory, 0, 2, device="cpu", weight_layout="packed")
    stock = load_full_model(directory, manifest, torch.device("cpu"), layout="stock")
    layers = decoder_layers(stock, manifest.num_blocks)[:2]
    dense_bytes = sum(p.numel() * p.element_size() for layer in layers for p in layer.parameters())
    assert engine.parameter_bytes() == dense_bytes


def test_auto_times_both_layouts_once_per_process_and_keeps_its_choice(tiny_llama_dir: str) -> None:
    directory = Path(tiny_llama_dir)
    first = SpanEngine.load(directory, 0, 2, device="cpu").weight_layout
    assert first.how == "measured" and set(first.packed_over_stock) == {1, 16}
    assert first.describe().startswith(f"{first.layout} (measured: packed/stock ")
    engine = SpanEngine.load(directory, 0, 2, device="cpu")  # same shapes, threads and rows: the same answer
    assert engine.weight_layout == first
    assert layout_of(engine._model) == first.layout
    assert set(choose_layout(engine._model, "auto", batch_rows=4).packed_over_stock) == {1, 4}


def test_a_model_with_nothing_packable_keeps_its_layout_whatever_the_setting() -> None:
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16))
    choice = apply_weight_layout(model, "packed")
    assert (choice.layout, choice.how) == ("stock", "fixed")
    assert type(model[0]) is nn.Linear
    stock = nn.Sequential(nn.Linear(8, 8))
    assert apply_weight_layout(stock, "stock").describe() == "stock (set)"
    assert type(stock[0]) is nn.Linear


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, stock, packed"):
        check_layout_setting("blocked")
