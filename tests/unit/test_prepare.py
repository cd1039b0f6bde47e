"""`coop model prepare` and `coop model info`: layout, idempotence, dtypes, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coop.errors import ModelNotFound, ModelStoreError, UnsupportedModel
from coop.model.manifest import MANIFEST_FILE, Manifest, SamplingDefaults
from coop.model.prepare import prepare
from tests.tiny_models import TINY_CONFIGS, save_tiny_model


def test_layout_and_manifest(tmp_path: Path) -> None:
    manifest = prepare(str(save_tiny_model("mixtral", tmp_path / "hf")), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "config.json").is_file() and (out / "client.safetensors").is_file()
    assert sorted(p.name for p in (out / "blocks").iterdir()) == [f"{i:04d}.safetensors" for i in range(6)]
    assert manifest.num_blocks == 6 and manifest.architecture == "MixtralForCausalLM"
    block0 = load_file(str(out / "blocks/0000.safetensors"))
    assert manifest.blocks[0].param_count == sum(t.numel() for t in block0.values())
    # 2 of 4 experts run per token: active parameters are fewer than all parameters
    assert manifest.blocks[0].active_param_count < manifest.blocks[0].param_count
    assert manifest.blocks[0].flops_per_token == 2 * manifest.blocks[0].active_param_count
    assert set(manifest.files) == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert Manifest.load(out) == manifest


def test_rerun_is_a_noop_and_changes_are_picked_up(tmp_path: Path) -> None:
    hf = save_tiny_model("llama", tmp_path / "hf")
    first = prepare(str(hf), tmp_path / "out")
    stamp = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    assert prepare(str(hf), tmp_path / "out") == first
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == stamp
    save_tiny_model("llama", hf, seed=1)  # new weights, same place
    second = prepare(str(hf), tmp_path / "out")
    assert second.content_hash != first.content_hash


def _recommend(hf: Path, **sampling: float) -> None:
    path = hf / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "do_sample": True, **sampling}))


def test_sampling_defaults_from_generation_config_and_flags(tmp_path: Path) -> None:
    hf = save_tiny_model("llama", tmp_path / "hf")
    assert prepare(str(hf), tmp_path / "plain").sampling_defaults.is_empty  # transformers' own file states none
    _recommend(hf, temperature=0.6, top_p=0.95)
    first = prepare(str(hf), tmp_path / "out")
    assert first.sampling_defaults == SamplingDefaults(temperature=0.6, top_p=0.95, origin="generation_config.json")
    blocks = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "blocks").iterdir()}
    # a flag overrides one parameter; the rest still comes from the source; only the manifest is rewritten
    second = prepare(
        str(hf), tmp_path / "out", sampling=SamplingDefaults(temperature=0.3, top_k=20, origin="command line")
    )
    assert second.sampling_defaults == SamplingDefaults(
        temperature=0.3, top_p=0.95, top_k=20, origin="command line, generation_config.json"
    )
    assert second.content_hash == first.content_hash
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "blocks").iterdir()} == blocks
    assert Manifest.load(tmp_path / "out") == second


def test_bad_recommended_sampling_is_refused(tmp_path: Path) -> None:
    hf = save_tiny_model("llama", tmp_path / "hf")
    _recommend(hf, temperature=-1)
    with pytest.raises(ModelStoreError, match=r"generation_config\.json has unusable sampling values"):
        prepare(str(hf), tmp_path / "out")


def test_manifest_without_sampling_defaults_still_loads(tmp_path: Path) -> None:
    """Manifests written before sampling defaults existed: no recommendation, same model."""
    manifest = prepare(str(save_tiny_model("llama", tmp_path / "hf")), tmp_path / "out")
    stored = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    del stored["sampling_defaults"]
    (tmp_path / "out" / MANIFEST_FILE).write_text(json.dumps(stored))
    old = Manifest.load(tmp_path / "out")
    assert old.sampling_defaults.is_empty and old.content_hash == manifest.content_hash


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(tmp_path: Path, dtype: str) -> None:
    manifest = prepare(str(save_tiny_model("qwen3", tmp_path / "hf")), tmp_path / "out", dtype=dtype)
    assert manifest.dtype == dtype
    tensors = load_file(str(tmp_path / "out" / "blocks/0002.safetensors"))
    assert {t.dtype for t in tensors.values()} == {getattr(torch, dtype)}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        prepare(str(tmp_path / "missing"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedModel, match=r"config\.json"):
        prepare(str(tmp_path / "empty"), tmp_path / "out")
    with pytest.raises(ModelStoreError, match="unknown dtype"):
        prepare(str(tmp_path / "empty"), tmp_path / "out", dtype="int3")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("keep me")
    with pytest.raises(ModelStoreError, match="not a Coop model directory"):
        prepare(str(save_tiny_model("llama", tmp_path / "hf")), tmp_path / "taken")
    assert (tmp_path / "taken" / "precious.txt").read_text() == "keep me"


def test_cli_info_verifies_hashes(tmp_path: Path) -> None:
    assert "qwen3_moe" in TINY_CONFIGS
    hf = save_tiny_model("qwen3_moe", tmp_path / "hf")
    coop = [sys.executable, "-m", "coop.cli"]
    done = subprocess.run(
        [*coop, "model", "prepare", str(hf), "--out", str(tmp_path / "out"), "--temperature", "0.7", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # --quiet: no messages, no progress bar
    info = subprocess.run(
        [*coop, "model", "info", str(tmp_path / "out"), "--verify"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 0 and "Qwen3MoeForCausalLM" in info.stdout and "verified" in info.stdout
    assert "temperature=0.7 (from command line)" in info.stdout
    (tmp_path / "out" / "client.safetensors").write_bytes(b"garbage")
    broken = subprocess.run(
        [*coop, "model", "info", str(tmp_path / "out"), "--verify"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert broken.returncode == 1 and "client.safetensors is corrupt" in broken.stderr
