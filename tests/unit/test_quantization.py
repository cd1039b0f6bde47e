"""`coop model prepare --quantize`: what the manifest records, what nodes load, what stays the same."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from coop.errors import ModelStoreError
from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine
from coop.model.manifest import Manifest
from coop.model.prepare import prepare
from coop.model.skeleton import decoder_layers
from coop.node.throughput import estimate_throughput
from coop.pipeline.generation import collect_tokens
from coop.pipeline.local import LocalChain
from coop.pipeline.sampling import SamplingParams
from tests.tiny_models import save_tiny_model

PROMPT = [5, 17, 42, 8, 91, 3, 60]
MAX_TOKENS = 12
# The torchao tensor class each quantization leaves in a block's Linear weights.
WEIGHT_CLASSES = {"int8": "Int8Tensor", "int4": "IntxUnpackedToInt8Tensor"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny Llama prepared three ways."""
    root = tmp_path_factory.mktemp("quantized")
    hf = save_tiny_model("llama", root / "hf")
    for quantization in ("none", "int8", "int4"):
        prepare(str(hf), root / quantization, quantize=quantization, quiet=True)
    return {q: root / q for q in ("none", "int8", "int4")}


def _greedy(model_dir: Path, spans: list[tuple[int, int]]) -> list[int]:
    client = ClientPart.load(model_dir, device="cpu")
    chain = LocalChain([SpanEngine.load(model_dir, a, b, device="cpu") for a, b in spans], max_length=64)
    try:
        return asyncio.run(collect_tokens(client, chain, PROMPT, SamplingParams(max_tokens=MAX_TOKENS)))
    finally:
        asyncio.run(chain.close())


def _block_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in (model_dir / "blocks").iterdir())


def test_manifest_records_it_hash_differs_flops_stay(stores: dict[str, Path]) -> None:
    manifests = {q: Manifest.load(path) for q, path in stores.items()}
    assert {q: m.quantization for q, m in manifests.items()} == {"none": "none", "int8": "int8", "int4": "int4"}
    assert len({m.content_hash for m in manifests.values()}) == 3  # three different models in the directory
    plain = manifests["none"]
    for quantized in (manifests["int8"], manifests["int4"]):
        assert quantized.blocks == plain.blocks  # same param counts, FLOPs per token, hence credits
        assert quantized.client_param_count == plain.client_param_count
        assert quantized.files["client.safetensors"] == plain.files["client.safetensors"]  # the client part stays
    # float32 weights become 1 byte each (plus scales): the block files shrink to well under half
    assert _block_bytes(stores["int8"]) < _block_bytes(stores["none"]) / 2
    assert _block_bytes(stores["int4"]) < _block_bytes(stores["none"]) / 2


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_nodes_load_quantized_linears(stores: dict[str, Path], quantization: str) -> None:
    engine = SpanEngine.load(stores[quantization], 2, 4, device="cpu")
    layer = decoder_layers(engine._model, engine.manifest.num_blocks)[2]
    weights = {type(m.weight).__name__ for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    assert weights == {WEIGHT_CLASSES[quantization]}
    assert all(p.dtype == torch.float32 for p in layer.input_layernorm.parameters())  # norms stay float


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_split_quantized_equals_one_span(stores: dict[str, Path], quantization: str) -> None:
    """The exactness reference of a quantized model is the same quantized model in one span."""
    whole = _greedy(stores[quantization], [(0, 6)])
    assert _greedy(stores[quantization], [(0, 2), (2, 5), (5, 6)]) == whole
    assert len(whole) == MAX_TOKENS


def test_quantized_logits_differ_from_float(stores: dict[str, Path]) -> None:
    """The weights really are quantized: close to the float model, not equal to it."""
    hidden = {}
    for quantization in ("none", "int8"):
        client = ClientPart.load(stores[quantization], device="cpu")
        chain = LocalChain([SpanEngine.load(stores[quantization], 0, 6, device="cpu")], max_length=16)
        hidden[quantization] = asyncio.run(chain.step(client.embed(torch.tensor([PROMPT])), 0))
        asyncio.run(chain.close())
    assert not torch.equal(hidden["int8"], hidden["none"])
    torch.testing.assert_close(hidden["int8"], hidden["none"], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_node_budgets_count_the_bytes_stored(stores: dict[str, Path], quantization: str) -> None:
    """`--blocks auto` and `coop node doctor` count a block's bytes as its file holds them (header aside)."""
    manifest = Manifest.load(stores[quantization])
    stored = (stores[quantization] / manifest.blocks[0].file).stat().st_size
    # rows of 64 weights: scales and the header weigh ~15% here, under 1% in the demo model (576 per row)
    assert manifest.largest_block_bytes == pytest.approx(stored, rel=0.2)


def test_quantized_blocks_are_estimated_faster(stores: dict[str, Path]) -> None:
    plain, int8 = Manifest.load(stores["none"]), Manifest.load(stores["int8"])
    assert estimate_throughput(int8, 0, 6, "cpu") > estimate_throughput(plain, 0, 6, "cpu")


def test_bad_quantization_is_refused(tmp_path: Path) -> None:
    hf = save_tiny_model("llama", tmp_path / "hf")
    with pytest.raises(ModelStoreError, match=r"unknown quantization 'int3'; choose one of none, int8, int4"):
        prepare(str(hf), tmp_path / "out", quantize="int3")
    command = [sys.executable, "-m", "coop.cli", "model", "prepare", str(hf), "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [*command, "--quantize", "fp3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "unknown quantization 'fp3'" in done.stderr
    assert not (tmp_path / "out").exists()


def test_int4_needs_whole_groups(tmp_path: Path) -> None:
    config = LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(ModelStoreError, match="not a multiple of the int4 group size 32; prepare this model with"):
        prepare(str(tmp_path / "hf"), tmp_path / "out", quantize="int4", quiet=True)


# What `coop node start` does before it imports transformers, then what a node loads; prints whether
# torchao was imported and whether transformers saw it.
_NODE_START = """
import sys
from coop.cli.node import load_torchao_only_if_quantized
from coop.config import NodeSettings

load_torchao_only_if_quantized(NodeSettings(model_dir=sys.argv[1], blocks="0:2"))
from coop.model.engine import SpanEngine
from transformers.utils import is_torchao_available

SpanEngine.load(sys.argv[1], 0, 2, device="cpu")
print(sys.modules.get("torchao") is not None, is_torchao_available())
"""


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_only_a_quantized_node_imports_torchao(stores: dict[str, Path], quantization: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _NODE_START, str(stores[quantization])], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    quantized = quantization != "none"
    assert done.stdout.split() == [str(quantized), str(quantized)]
