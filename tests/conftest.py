"""Shared fixtures: offline hub, a clean environment per test, no leftover processes, tiny random models,
a pool with members."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.reaper import mark_this_run, processes_of_this_run, reap, started_since

if TYPE_CHECKING:
    from tests.pg_server import PostgresServer
    from tests.pools import MemberPool

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RUN_ID = mark_this_run()  # inherited by every process the tests start (tests/reaper.py)
# processes of session-scoped fixtures (the PostgreSQL server): they, and their children, outlive modules
OUTLIVE_MODULES: set[int] = set()


# Longest first: pytest-xdist hands test files to its workers in collection order, so the docker image
# build and the real-process pools start early on both workers instead of one worker finishing them alone.
_FOLDER_ORDER = ("docker", "e2e", "adversarial", "integration", "ledger", "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        folder = item.path.parent.name
        return _FOLDER_ORDER.index(folder) if folder in _FOLDER_ORDER else len(_FOLDER_ORDER)

    items.sort(key=rank)  # stable: within a folder, files and tests keep their order


@pytest.fixture(autouse=True)
def _clean_coop_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No COOP_* setting leaks from the developer's shell or from another test."""
    for key in list(os.environ):
        if key.startswith("COOP_"):
            monkeypatch.delenv(key)
    yield


@pytest.fixture(scope="session", autouse=True)
def _reap_leftover_processes() -> Iterator[None]:
    """At the end of the session, every process this run started and left running is ended, orphans too."""
    yield
    reap(processes_of_this_run(RUN_ID).values(), "at the end of the session")


@pytest.fixture(scope="module", autouse=True)
def _reap_module_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each module, the processes it started and left running are ended (session fixtures' are kept)."""
    before = set(processes_of_this_run(RUN_ID))
    yield
    reap(started_since(RUN_ID, before, OUTLIVE_MODULES), f"after {request.module.__name__}")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prepared once per machine and reused: preparing the demo GGUF takes ~30 s.
DEMO_MODEL_DIR = os.environ.get("COOP_TEST_DEMO_DIR", os.path.join(REPO_ROOT, ".cache", "smollm2-demo"))
# Gemma 3 270M: its GGUF is joined from chunk packages and dequantised once per machine (a few minutes).
GEMMA3_MODEL_DIR = os.environ.get("COOP_TEST_GEMMA3_DIR", os.path.join(REPO_ROOT, ".cache", "gemma3-270m"))


def _prepare_once(src: str, model_dir: str) -> str:
    """Prepared under a file lock: pytest-xdist workers share the directory, and only one may write it."""
    import fcntl

    from coop.model.prepare import prepare

    os.makedirs(os.path.dirname(model_dir), exist_ok=True)
    with open(f"{model_dir}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prepare(src, model_dir, dtype="float32", quiet=True)
    return model_dir


@pytest.fixture(scope="session")
def demo_model_dir() -> str:
    return _prepare_once("smollm2-demo", DEMO_MODEL_DIR)


@pytest.fixture(scope="session")
def gemma3_model_dir() -> str:
    return _prepare_once("gemma3-270m", GEMMA3_MODEL_DIR)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from coop.model.prepare import prepare
    from tests.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-llama")
    prepare(str(save_tiny_model("llama", root / "hf")), root / "coop", dtype="float32")
    return str(root / "coop")


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: str) -> str:
    """A tiny random Llama that speaks through the demo model's tokenizer: chat in milliseconds."""
    import shutil
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from coop.model.prepare import prepare

    root = tmp_path_factory.mktemp("tiny-chat")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (Path(demo_model_dir) / name).is_file():
            shutil.copy(Path(demo_model_dir) / name, root / "hf" / name)
    prepare(str(root / "hf"), root / "coop")
    return str(root / "coop")


@pytest.fixture
def member_pool(tmp_path: Path) -> MemberPool:
    """A fresh pool (tmp_path/"pool") with members alpha, beta and coord, each with its bundle loaded."""
    from tests.pools import make_member_pool

    return make_member_pool(tmp_path / "pool")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the whole session, started on first use (tests/pg_server.py)."""
    from tests.pg_server import PostgresUnavailable, postgres_server

    try:
        before = set(processes_of_this_run(RUN_ID))
        with postgres_server() as server:
            OUTLIVE_MODULES.update(set(processes_of_this_run(RUN_ID)) - before)
            yield server
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)  # never a skip: the PostgreSQL ledger must be tested


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database, dropped after the test."""
    name = postgres.create_database()
    try:
        yield postgres.url(name)
    finally:
        postgres.drop_database(name)
