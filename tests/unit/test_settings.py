"""Every setting of a node and a coordinator, set from each source through the real `coop … config`
command: by environment only, by config file only, and by flag over both (flag > env > file > default).
Also: one-line errors for a bad file, the generated docs/configuration.md, and the systemd env files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from coop.cli.settings_doc import DOC_PATH, render
from coop.cli.settings_options import MODEL_FLAG
from coop.config import CoordinatorSettings, NodeSettings
from coop.config_sources import env_name, field_extra, flag_name, resolve
from tests.conftest import REPO_ROOT

MODELS: dict[str, type[BaseSettings]] = {"node": NodeSettings, "coordinator": CoordinatorSettings}
FIELDS = [(role, name) for role, model in MODELS.items() for name in model.model_fields]
SOURCES = ("env", "file", "flag")


def _base(annotation: Any) -> Any:
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    return args[0] if args and getattr(annotation, "__origin__", None) is not tuple else annotation


def _bound(field: FieldInfo, name: str) -> float | None:
    return next((getattr(m, name) for m in field.metadata if getattr(m, name, None) is not None), None)


def sample(name: str, field: FieldInfo) -> dict[str, Any]:
    """A value per source, each unlike the default, the flag's unlike the other two."""
    base = _base(field.annotation)
    if base is bool:
        return {"env": not field.default, "file": not field.default, "flag": bool(field.default)}
    if base in (int, float):
        le = _bound(field, "le")
        if base is float and le is not None and le <= 1:
            return dict(zip(SOURCES, (0.11, 0.22, 0.33), strict=True))
        start = field.default or 0
        step = 1 if base is int else 1.5
        if le is not None and start + 3 * step > le:
            step = -step
        return {source: start + (i + 1) * step for i, source in enumerate(SOURCES)}
    if getattr(base, "__origin__", None) is tuple:
        return {source: [f"/tmp/{source}-{name}-{i}" for i in range(2)] for source in SOURCES}
    if name == "cpu_weight_layout":
        return {"env": "stock", "file": "stock", "flag": "packed"}
    if name == "public_endpoint":
        return {source: f"{source}-host:{i + 1}" for i, source in enumerate(SOURCES)}
    return {source: f"/tmp/{source}-{name}" for source in SOURCES}


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, list) else str(value)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value)


def _flag_args(model: type[BaseSettings], values: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for name, value in values.items():
        flag = flag_name(model.model_fields[name], name)
        if flag == MODEL_FLAG:
            continue
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        else:
            for item in value if isinstance(value, list) else [value]:
                args += [flag, str(item)]
    dirs = [name for name, f in model.model_fields.items() if flag_name(f, name) == MODEL_FLAG]
    return [*args, *(a for d in [values[dirs[0]], *values[dirs[1]]] for a in (MODEL_FLAG, str(d)))]


def run_config(role: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COOP_")}
    return subprocess.run(
        [sys.executable, "-m", "coop.cli", role, "config", *args],
        env={**clean, **env, "PYTHONPATH": REPO_ROOT},
        capture_output=True,
        text=True,
        timeout=120,
    )


def parse(output: str) -> dict[str, tuple[Any, str]]:
    """{name: (value or None when unset, source)} from `coop … config`."""
    shown = {}
    for line in output.splitlines():
        setting, _, source = line.rpartition("  # ")
        if setting.startswith("# "):
            shown[setting[2:].split()[0]] = (None, source)
        else:
            name = setting.split(" = ")[0]
            shown[name] = (tomllib.loads(setting)[name], source)
    return shown


@pytest.fixture(scope="module")
def effective(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, tuple[Any, str]]]:
    """(role, case) -> what `coop ROLE config` shows, for the cases env only, file only, flag over both."""
    shown = {}
    for role, model in MODELS.items():
        values = {name: sample(name, field) for name, field in model.model_fields.items()}
        env = {env_name(model, name): _env_text(v["env"]) for name, v in values.items()}
        config = tmp_path_factory.mktemp(role) / f"{role}.toml"
        config.write_text("".join(f"{name} = {_toml(v['file'])}\n" for name, v in values.items()))
        flags = _flag_args(model, {name: v["flag"] for name, v in values.items()})
        for case, args, case_env in (
            ("env", [], env),
            ("file", ["--config", str(config)], {}),
            ("flag", [*flags, "--config", str(config)], env),
        ):
            result = run_config(role, args, case_env)
            assert result.returncode == 0, result.stderr
            shown[role, case] = parse(result.stdout)
    return shown


@pytest.mark.parametrize(("role", "name"), FIELDS, ids=[f"{role}.{name}" for role, name in FIELDS])
@pytest.mark.parametrize("case", SOURCES)
def test_every_setting_from_each_source(
    effective: dict[tuple[str, str], dict[str, tuple[Any, str]]], role: str, name: str, case: str
) -> None:
    model = MODELS[role]
    field = model.model_fields[name]
    value, source = effective[role, case][name]
    where = {"env": f"env {env_name(model, name)}", "file": "file ", "flag": f"flag {flag_name(field, name)}"}[case]
    assert source.startswith(where) and (case != "file" or source.endswith(f"{role}.toml"))
    expected = sample(name, field)[case]
    if field_extra(field, "secret"):
        assert value == "********"
    else:
        assert value == expected


@pytest.mark.parametrize(("role", "name"), FIELDS, ids=[f"{role}.{name}" for role, name in FIELDS])
def test_every_setting_is_documented_and_named_alike(role: str, name: str) -> None:
    model = MODELS[role]
    field = model.model_fields[name]
    assert field.description and field_extra(field, "unit")
    assert env_name(model, name) == f"COOP_{role.upper()}_{name.upper()}"
    assert flag_name(field, name) in (f"--{name.replace('_', '-')}", "--model", "--member")


def test_configuration_doc_is_current() -> None:
    assert DOC_PATH.read_text() == render(), "docs/configuration.md is stale: python -m coop.cli.settings_doc"


def test_config_shows_sources_and_defaults(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('max_blocks = 3\ncache_budget_mb = 100\nblocks = "0:2"\n')
    env = {"COOP_NODE_CACHE_BUDGET_MB": "200"}
    result = run_config("node", ["--model", "/m", "--config", str(config), "--blocks", "1:2"], env)
    shown = parse(result.stdout)
    assert shown["max_blocks"] == (3, f"file {config}")
    assert shown["cache_budget_mb"] == (200, "env COOP_NODE_CACHE_BUDGET_MB")
    assert shown["blocks"] == ("1:2", "flag --blocks")
    assert shown["model_dir"] == ("/m", "flag --model")
    assert shown["drain_deadline_s"] == (60.0, "default") and shown["metrics_port"] == (None, "default")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_blocks = -1\n", "node.toml: max_blocks: Input should be greater than or equal to 0"),
        ('max_blocks = "many"\n', "node.toml: max_blocks: Input should be a valid integer"),
        ("max_blockz = 1\n", "node.toml: unknown setting 'max_blockz'"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(text)
    result = run_config("node", ["--model", "/m", "--config", str(config)], {})
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path}/") and message in line


@pytest.mark.parametrize("unit", ["coop-node", "coop-coordinator"])
def test_systemd_env_files_hold_valid_settings(unit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every COOP_NODE_* / COOP_COORDINATOR_* variable of the example env files is a setting, and valid."""
    role = unit.removeprefix("coop-")
    text = (Path(REPO_ROOT) / "docs" / "systemd" / f"{unit}.env").read_text()
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    env = {key: value.strip("'") for key, value in pairs}  # systemd drops the single quotes
    prefix = f"COOP_{role.upper()}_"
    model = MODELS[role]
    assert {key.removeprefix(prefix).lower() for key in env if key.startswith(prefix)} <= set(model.model_fields)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    resolved = resolve(model, {}, None)
    assert all(resolved.sources[key.removeprefix(prefix).lower()] == f"env {key}" for key in env if prefix in key)
