"""Hashing and reading the files of a prepared model, always checked against the manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from coop.errors import ModelIntegrityError, ModelNotFound
from coop.model.manifest import CLIENT_FILE, Manifest
from coop.model.quantization import restore_quantized
from coop.model.verified import already_verified, remember_verified, settled_signature

_CHUNK_BYTES = 4 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(model_dir: Path, manifest: Manifest, rel_path: str, *, trust_unchanged: bool = False) -> Path:
    """The file's path once its sha256 matches the manifest's.

    trust_unchanged: skip the hash when the file has not changed since it last matched (see
    `coop.model.verified` for what that does and does not catch).
    """
    path = model_dir / rel_path
    expected = manifest.files.get(rel_path)
    if expected is None:
        raise ModelIntegrityError(f"{rel_path} is not listed in {model_dir}/manifest.json")
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing; prepare the model again with `coop model prepare`")
    signature = settled_signature(path)
    if trust_unchanged and signature and already_verified(model_dir, rel_path, expected, signature):
        return path
    actual = sha256_file(path)
    if actual != expected:
        raise ModelIntegrityError(
            f"{path} is corrupt: sha256 {actual[:16]}… differs from the manifest's {expected[:16]}…; "
            "prepare the model again or copy the file from a good replica"
        )
    if signature and signature == settled_signature(path):  # not written to while it was being hashed
        remember_verified(model_dir, rel_path, expected, signature)
    return path


def verify_all(model_dir: Path, manifest: Manifest) -> None:
    for rel_path in manifest.files:
        verify_file(model_dir, manifest, rel_path)


def load_tensors(model_dir: Path, manifest: Manifest, rel_path: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Verify one safetensors file against the manifest (unless unchanged since it last matched), then
    read it straight onto `device`; a quantized model's block files come back as quantized tensors."""
    path = verify_file(model_dir, manifest, rel_path, trust_unchanged=True)
    tensors = load_file(str(path), device=str(device))
    if manifest.quantization != "none" and rel_path != CLIENT_FILE:
        return restore_quantized(path, tensors)
    return tensors
