"""Each package's `__all__` is exactly its public API: every name in it exists, and none is missing.

Packages are found by reading the source (every `coop/**/__init__.py` that assigns `__all__`), so a
new one is checked without editing this file. A module inside a package that the package exports
from is exported whole: every public class (and class alias) it defines is in `__all__`. That is
how a new error class in `coop.errors`, or a new result type in `coop.client.http`, fails here if
`__all__` forgets it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import coop
import coop.errors

ROOT = Path(coop.__file__).parent.parent


def _module_file(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _declared_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return None


def _packages() -> list[str]:
    found = []
    for init in sorted((ROOT / "coop").rglob("__init__.py")):
        if _declared_all(ast.parse(init.read_text())) is not None:
            found.append(".".join(init.parent.relative_to(ROOT).parts))
    return found


PACKAGES = _packages()


def _imported_from(package: str) -> dict[str, str]:
    """Name -> module of every `from X import name` in the package's __init__ (TYPE_CHECKING ones too)."""
    tree = ast.parse(_module_file(package).read_text())
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = node.module
    return names


def _public_classes(module: str) -> set[str]:
    """Top-level public classes of a module, and public aliases of them (`CompletionResult = ChatResult`)."""
    tree = ast.parse(_module_file(module).read_text())
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    aliases = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in classes
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    return {name for name in classes | aliases if not name.startswith("_")}


def test_packages_with_all_are_found() -> None:
    assert {"coop", "coop.client", "coop.admin"} <= set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_exists(package: str) -> None:
    module = importlib.import_module(package)
    exported = list(module.__all__)
    assert exported == sorted(exported), f"{package}.__all__ is not sorted"
    assert len(exported) == len(set(exported)), f"{package}.__all__ names something twice"
    missing = [name for name in exported if not hasattr(module, name)]  # lazy names load here too
    assert not missing, f"{package}.__all__ names what {package} does not have: {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_exported_from_are_exported_whole(package: str) -> None:
    exported = set(importlib.import_module(package).__all__)
    imported = _imported_from(package)
    sources = {imported[name] for name in exported if imported.get(name, "").startswith(package + ".")}
    for source in sorted(sources):
        missing = sorted(_public_classes(source) - exported)
        assert not missing, f"{package} exports from {source} but not {missing}: add them to {package}.__all__"


def test_coop_exports_the_whole_error_tree() -> None:
    errors = {
        name
        for name, value in vars(coop.errors).items()
        if isinstance(value, type) and issubclass(value, coop.errors.CoopError) and value.__module__ == "coop.errors"
    }
    assert set(coop.__all__) == errors | {"__version__"}
    for name in errors:
        assert getattr(coop, name) is getattr(coop.errors, name)


def test_the_sdk_exports_the_errors_it_raises() -> None:
    import coop.client

    assert coop.client.ApiError is coop.errors.ApiError
    assert coop.client.ReplayUnavailable is coop.errors.ReplayUnavailable
    from coop.client import remote_model

    for name in ("RemoteModel", "InferenceSession", "AutoDistributedModelForCausalLM"):
        assert getattr(coop.client, name) is getattr(remote_model, name)
