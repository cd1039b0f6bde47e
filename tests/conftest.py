"""Shared fixtures: offline hub, a clean environment per test, tiny random models."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _clean_coop_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No COOP_* setting leaks from the developer's shell or from another test."""
    for key in list(os.environ):
        if key.startswith("COOP_"):
            monkeypatch.delenv(key)
    yield


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prepared once per machine and reused: preparing the demo GGUF takes ~30 s.
DEMO_MODEL_DIR = os.environ.get("COOP_TEST_DEMO_DIR", os.path.join(REPO_ROOT, ".cache", "smollm2-demo"))


@pytest.fixture(scope="session")
def demo_model_dir() -> str:
    from coop.model.prepare import prepare

    prepare("smollm2-demo", DEMO_MODEL_DIR, dtype="float32")
    return DEMO_MODEL_DIR


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from coop.model.prepare import prepare
    from tests.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-llama")
    prepare(str(save_tiny_model("llama", root / "hf")), root / "coop", dtype="float32")
    return str(root / "coop")
