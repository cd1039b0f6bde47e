"""`coop model prepare`: convert a Hugging Face directory or a GGUF file into a Coop model store.

Conversion loads the source once through transformers (which dequantises GGUF and converts its
tokenizer: ~30 s for the demo model) and writes one safetensors file per decoder block, so that
a node later reads only the blocks it serves. The source must fit in memory once, in the target
dtype.

The manifest also records the sampling the model's authors recommend (`SamplingDefaults`), which
the API applies to whatever a request leaves unset. Each parameter comes from the first of: the
command line (`--temperature`, `--top-p`, `--top-k`), the source's `generation_config.json` (as
vLLM reads it), and `MODEL_CARD_SAMPLING`, for models whose card states it but whose files do not
(the demo GGUF). They are not weights: changing them rewrites only the manifest, not the hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from coop.errors import ModelNotFound, ModelStoreError, UnsupportedModel
from coop.model.files import sha256_file
from coop.model.manifest import (
    CLIENT_FILE,
    MANIFEST_FILE,
    SAMPLING_FIELDS,
    BlockInfo,
    Manifest,
    SamplingDefaults,
    SourceInfo,
    block_file,
)
from coop.model.packaged import DEMO_MODEL, PACKAGED_MODELS, packaged_gguf_path
from coop.model.quantization import Quantization, check_quantization, quantize_block, save_block
from coop.model.skeleton import check_spans_compose, decoder_layers, layers_prefix
from coop.progress import progress_bar

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Recommended sampling stated in a model card, where the model's files carry none.
# SmolLM2-135M-Instruct: https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct ("temperature=0.2, top_p=0.9").
MODEL_CARD_SAMPLING = {DEMO_MODEL: SamplingDefaults(temperature=0.2, top_p=0.9, origin="model card")}

# Parameter names that belong to routed experts: only `experts_per_token / num_experts` of them
# run for any one token.
_EXPERT_MARKER = ".experts."


@dataclass(frozen=True)
class Source:
    kind: str  # "hf-dir" | "gguf"
    path: Path

    @property
    def gguf_file(self) -> str | None:
        return self.path.name if self.kind == "gguf" else None

    @property
    def load_dir(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path


def resolve_source(src: str) -> Source:
    if src in PACKAGED_MODELS:
        return Source("gguf", packaged_gguf_path(src))
    path = Path(src).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return Source("gguf", path.resolve())
    if path.is_dir() and (path / "config.json").is_file():
        return Source("hf-dir", path.resolve())
    if not path.exists():
        packaged = ", ".join(PACKAGED_MODELS)
        raise ModelNotFound(f"model source {src} does not exist (expected a directory, a .gguf file or {packaged})")
    raise UnsupportedModel(f"{src} is neither a Hugging Face model directory (with config.json) nor a .gguf file")


def source_fingerprint(source: Source) -> str:
    files = [source.path] if source.kind == "gguf" else sorted(p for p in source.path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(source.load_dir)}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _generation_config_sampling(source: Source) -> SamplingDefaults:
    """What the source's generation_config.json recommends (only the values it states)."""
    path = source.path / "generation_config.json"
    if source.kind != "hf-dir" or not path.is_file():
        return SamplingDefaults()
    try:
        config = json.loads(path.read_text())
        stated = {k: config[k] for k in SAMPLING_FIELDS if isinstance(config, dict) and config.get(k) is not None}
        return SamplingDefaults.model_validate({**stated, "origin": path.name})
    except ValueError as exc:  # bad JSON, or values out of range (pydantic's ValidationError is a ValueError)
        raise ModelStoreError(f"{path} has unusable sampling values: {exc}") from exc


def recommended_sampling(src: str, source: Source, overrides: SamplingDefaults) -> SamplingDefaults:
    """Each parameter from the first layer that states it: overrides, generation_config.json, model card."""
    layers = [overrides, _generation_config_sampling(source), MODEL_CARD_SAMPLING.get(src, SamplingDefaults())]
    chosen: dict[str, float | int] = {}
    origins: list[str] = []
    for layer in layers:
        stated = {k: getattr(layer, k) for k in SAMPLING_FIELDS if getattr(layer, k) is not None and k not in chosen}
        if stated:
            chosen |= stated
            origins.append(layer.origin)
        if len(chosen) == len(SAMPLING_FIELDS):
            break
    return SamplingDefaults.model_validate({**chosen, "origin": ", ".join(origins)})


def _is_up_to_date(out: Path, fingerprint: str, dtype: str, quantization: Quantization) -> Manifest | None:
    try:
        manifest = Manifest.load(out)
    except ModelStoreError:
        return None
    same_source = (
        manifest.source.fingerprint == fingerprint and manifest.dtype == dtype and manifest.quantization == quantization
    )
    files_present = all((out / rel).is_file() for rel in manifest.files)
    return manifest if same_source and files_present else None


def _active_params(name_to_numel: dict[str, int], experts_per_token: int, num_experts: int) -> int:
    total = 0
    for name, numel in name_to_numel.items():
        if num_experts > 0 and _EXPERT_MARKER in f".{name}.":
            total += numel * experts_per_token // num_experts
        else:
            total += numel
    return total


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with one already kept (tied embeddings): safetensors refuses them."""
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
        if key in seen:
            continue
        seen.add(key)
        kept[name] = tensor.detach().contiguous()
    return kept


def _load_source(source: Source, dtype: torch.dtype, console: Console) -> tuple[PreTrainedModel, object | None]:
    console.print(f"[bold]Loading[/] {source.path} ({source.kind}) as {dtype} …")
    kwargs: dict[str, object] = {"dtype": dtype}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source.load_dir), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModel(f"transformers cannot load {source.path}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(source.load_dir), **({"gguf_file": source.gguf_file} if source.gguf_file else {})
        )
    except (OSError, ValueError, KeyError, TypeError):
        console.print("[yellow]No tokenizer in the source[/]: the model will accept token ids only.")
        tokenizer = None
    check_spans_compose(model.eval(), int(model.config.get_text_config().num_hidden_layers))
    return model, tokenizer


def _drop_loading_options(tokenizer_config: Path) -> None:
    """transformers saves how the tokenizer was loaded (`local_files_only` follows HF_HUB_OFFLINE) into its
    config: that would make the content hash depend on the preparer's environment, and a member's copy of
    the same model would never share a route with the operator's."""
    if not tokenizer_config.is_file():
        return
    config = json.loads(tokenizer_config.read_text())
    if config.pop("local_files_only", None) is not None:
        tokenizer_config.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _eos_ids(model: PreTrainedModel, tokenizer: object | None) -> list[int]:
    ids: set[int] = set()
    for candidate in (
        getattr(model.generation_config, "eos_token_id", None),
        model.config.eos_token_id,
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif isinstance(candidate, list):
            ids.update(int(c) for c in candidate)
    return sorted(ids)


def _content_hash(files: dict[str, str], quantization: Quantization) -> str:
    """Over every file's sha256 and, for a quantized model, the quantization too, so the name says so
    even where a block file would not (unquantized models keep the hash they always had)."""
    named: dict[str, object] = dict(files) if quantization == "none" else {"files": files, "quantization": quantization}
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()


def _describe(dtype: str, quantization: Quantization) -> str:
    return dtype if quantization == "none" else f"{dtype}, {quantization} weights"


@contextmanager
def _transformers_bars(*, enabled: bool) -> Iterator[None]:
    """transformers draws its own tqdm bars while loading, even into a pipe: only where ours would be."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def _staging_dir(out: Path) -> Iterator[Path]:
    """Write into a sibling temp dir and swap it in whole, so a crash never leaves a half model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def prepare(
    src: str,
    out: str | Path,
    *,
    dtype: str = "float32",
    quantize: str = "none",
    sampling: SamplingDefaults | None = None,
    quiet: bool = False,
    console: Console | None = None,
) -> Manifest:
    """`quantize`: weight-only quantization of the blocks (`coop.model.quantization`). `sampling`:
    recommended sampling that overrides the source's. `quiet`: no messages and no progress bars
    (transformers' own included)."""
    console = console or Console(stderr=True, quiet=quiet)
    out = Path(out).expanduser().resolve()
    quantization = _check_target(out, dtype, quantize)
    source = resolve_source(src)
    fingerprint = source_fingerprint(source)
    defaults = recommended_sampling(src, source, sampling or SamplingDefaults())
    if (current := _is_up_to_date(out, fingerprint, dtype, quantization)) is not None:
        return _refresh_sampling(current, out, defaults, quantization, console)

    with _transformers_bars(enabled=not quiet and console.is_terminal):
        model, tokenizer = _load_source(source, DTYPES[dtype], console)
    with _staging_dir(out) as staging:
        blocks, client_param_count = _write_blocks(model, staging, quantization, quiet=quiet)
        _write_config(model, tokenizer, staging, DTYPES[dtype])
        files = {str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        text_config = model.config.get_text_config()
        manifest = Manifest(
            name=src if src in PACKAGED_MODELS else source.path.stem,
            architecture=(model.config.architectures or [type(model).__name__])[0],
            model_type=model.config.model_type,
            dtype=dtype,
            num_blocks=len(blocks),
            hidden_size=int(text_config.hidden_size),
            vocab_size=int(text_config.vocab_size),
            config=json.loads(model.config.to_json_string()),
            blocks=blocks,
            client_param_count=client_param_count,
            has_tokenizer=tokenizer is not None,
            eos_token_ids=_eos_ids(model, tokenizer),
            files=files,
            content_hash=_content_hash(files, quantization),
            source=SourceInfo(kind=source.kind, path=str(source.path), fingerprint=fingerprint),
            sampling_defaults=defaults,
            quantization=quantization,
        )
        manifest.save(staging)
    console.print(
        f"[green]Prepared[/] {manifest.name}: {manifest.num_blocks} blocks, {_describe(dtype, quantization)}, "
        f"hash {manifest.content_hash[:12]} → {out}"
    )
    console.print(f"sampling defaults: {defaults.describe()}")
    return manifest


def _check_target(out: Path, dtype: str, quantize: str) -> Quantization:
    """Refuse a bad dtype, quantization or output directory before loading anything."""
    if dtype not in DTYPES:
        raise ModelStoreError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    quantization = check_quantization(quantize)
    if out.exists() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise ModelStoreError(f"{out} exists and is not a Coop model directory; choose another --out")
    return quantization


def _refresh_sampling(
    current: Manifest, out: Path, defaults: SamplingDefaults, quantization: Quantization, console: Console
) -> Manifest:
    """The store is already prepared from this source: at most its sampling defaults change (not the hash)."""
    if current.sampling_defaults == defaults:
        console.print(
            f"[green]Up to date[/]: {out} already holds {current.name} ({_describe(current.dtype, quantization)}); "
            "nothing to do."
        )
        return current
    current = current.model_copy(update={"sampling_defaults": defaults})
    current.save(out)
    console.print(f"[green]Updated[/] the sampling defaults of {out}: {defaults.describe()}")
    return current


def _write_blocks(
    model: PreTrainedModel, staging: Path, quantization: Quantization, *, quiet: bool
) -> tuple[list[BlockInfo], int]:
    """One safetensors file per decoder block, then everything else in the client file; returns the
    blocks and the client's parameter count."""
    text_config = model.config.get_text_config()
    num_blocks = int(text_config.num_hidden_layers)
    layers = decoder_layers(model, num_blocks)
    prefix = layers_prefix(model, layers) + "."
    num_experts = int(getattr(text_config, "num_local_experts", None) or getattr(text_config, "num_experts", None) or 0)
    experts_per_token = int(getattr(text_config, "num_experts_per_tok", 0) or 0)
    (staging / "blocks").mkdir()
    blocks: list[BlockInfo] = []
    with progress_bar("Writing blocks", num_blocks + 1, quiet=quiet) as advance:
        for index, layer in enumerate(layers):
            state = _unique_tensors(layer.state_dict())
            numel = {name: t.numel() for name, t in state.items()}  # before quantization: FLOPs stay
            if quantization != "none":
                state = quantize_block(layer, quantization, f"block {index}")
            save_block(state, staging / block_file(index), quantization)
            active = _active_params(numel, experts_per_token, num_experts)
            blocks.append(
                BlockInfo(
                    index=index,
                    file=block_file(index),
                    param_count=sum(numel.values()),
                    active_param_count=active,
                    flops_per_token=2 * active,
                )
            )
            advance()
        client_state = _unique_tensors({k: v for k, v in model.state_dict().items() if not k.startswith(prefix)})
        save_file(client_state, str(staging / CLIENT_FILE))
        advance()
    return blocks, sum(t.numel() for t in client_state.values())


def _write_config(model: PreTrainedModel, tokenizer: object | None, staging: Path, dtype: torch.dtype) -> None:
    """The model's config (as plain tensors of `dtype`), its generation config and its tokenizer."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF was dequantised: the blocks are plain tensors
    config.dtype = dtype
    config.save_pretrained(staging)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))  # type: ignore[attr-defined]
        _drop_loading_options(staging / "tokenizer_config.json")
