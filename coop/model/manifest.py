"""The manifest of a prepared model: what a node needs to know before loading a single tensor.

A prepared model directory looks like this::

    manifest.json          this file's content (see `Manifest`)
    config.json            the transformers config the blocks are built from
    generation_config.json (when the source has one)
    tokenizer files        (when the source has a tokenizer)
    client.safetensors     embeddings, final norm, LM head: the coordinator's part
    blocks/0000.safetensors ... one file per decoder block

`content_hash` names the model in the pool: two directories with the same hash hold the same
weights, config and tokenizer, so their blocks can be mixed in one route. `sampling_defaults` is a
serving preference, not part of the weights: it is left out of the hash and may change in place.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coop.errors import ModelNotFound, ModelStoreError
from coop.model.quantization import Quantization, stored_bytes_per_weight

MANIFEST_FILE = "manifest.json"
CLIENT_FILE = "client.safetensors"
FORMAT_VERSION = 1
DEFAULT_CONTEXT_LENGTH = 2048
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")


def block_file(index: int) -> str:
    return f"blocks/{index:04d}.safetensors"


class BlockInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    file: str
    param_count: int
    # Parameters touched per token (all of a dense block; the routed share of experts for MoE).
    active_param_count: int
    # 2 FLOPs per active parameter per token: the matmul cost, without the context-dependent
    # attention term, so that a token costs the same wherever it sits in the sequence.
    flops_per_token: int


class SourceInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: str  # "hf-dir" | "gguf"
    path: str
    fingerprint: str  # sha256 over the source files: unchanged source + same dtype => prepare is a no-op


class SamplingDefaults(BaseModel):
    """The sampling the model's authors recommend, used for whatever a request leaves unset.

    None: no recommendation, so the API's own default applies (OpenAI's temperature 1, no top-p or
    top-k cut). `origin` says where the numbers came from, for `coop model info` and the operator.
    """

    model_config = ConfigDict(frozen=True)

    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # 0 = no limit
    origin: str = ""  # "generation_config.json", "model card", "command line"

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, k) is None for k in SAMPLING_FIELDS)

    def describe(self) -> str:
        if self.is_empty:
            return "none recommended (requests that set none get temperature 1, as in OpenAI's API)"
        stated = ", ".join(f"{k}={getattr(self, k)}" for k in SAMPLING_FIELDS if getattr(self, k) is not None)
        return f"{stated} (from {self.origin})"


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    format_version: int = FORMAT_VERSION
    name: str
    architecture: str
    model_type: str
    dtype: str
    num_blocks: int
    hidden_size: int
    vocab_size: int
    config: dict[str, Any]
    blocks: list[BlockInfo]
    client_param_count: int
    has_tokenizer: bool
    eos_token_ids: list[int]
    files: dict[str, str]  # relative path -> sha256, every file but manifest.json
    content_hash: str
    source: SourceInfo
    # Absent from manifests written before it existed: no recommendation.
    sampling_defaults: SamplingDefaults = SamplingDefaults()
    # Weight-only quantization of the blocks' Linear layers (`coop.model.quantization`); part of the
    # content hash. Param counts and FLOPs stay those of the unquantized model.
    quantization: Quantization = "none"

    @property
    def context_length(self) -> int:
        """The most positions a session may hold: the model's trained context (2048 if its config is silent)."""
        text = self.config.get("text_config") or self.config
        return int(text.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH)

    @property
    def bytes_per_weight(self) -> float:
        """Bytes one block weight takes in memory: what a node's memory budget and speed estimate count."""
        return stored_bytes_per_weight(self.quantization, self.dtype)

    @property
    def largest_block_bytes(self) -> int:
        """Bytes of the largest block's parameters: what `--blocks auto` and `coop node doctor` count per block."""
        return math.ceil(max(b.param_count for b in self.blocks) * self.bytes_per_weight)

    @property
    def total_flops_per_token(self) -> int:
        return sum(b.flops_per_token for b in self.blocks)

    def span_flops_per_token(self, start: int, end: int) -> int:
        return sum(b.flops_per_token for b in self.blocks[start:end])

    def save(self, model_dir: Path) -> None:
        """Write atomically: nodes and coordinators may read the manifest while it is rewritten."""
        staged = model_dir / f".{MANIFEST_FILE}.{os.getpid()}"
        staged.write_text(json.dumps(self.model_dump(), indent=2) + "\n")
        os.replace(staged, model_dir / MANIFEST_FILE)

    @classmethod
    def load(cls, model_dir: str | Path) -> Manifest:
        path = Path(model_dir) / MANIFEST_FILE
        if not Path(model_dir).is_dir():
            raise ModelNotFound(
                f"model directory {model_dir} does not exist; create it with `coop model prepare SRC --out {model_dir}`"
            )
        if not path.is_file():
            raise ModelNotFound(
                f"{model_dir} is not a prepared Coop model (no {MANIFEST_FILE}); "
                f"run `coop model prepare SRC --out {model_dir}`"
            )
        try:
            manifest = cls.model_validate_json(path.read_text())
        except (ValidationError, ValueError) as exc:
            raise ModelStoreError(f"{path} is not a valid manifest: {exc}") from exc
        if manifest.format_version != FORMAT_VERSION:
            raise ModelStoreError(
                f"{path} has format version {manifest.format_version}, this Coop reads {FORMAT_VERSION}; "
                "prepare the model again"
            )
        return manifest
