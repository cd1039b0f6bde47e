"""Effective settings from four sources, and where each value came from.

Precedence, for every field: a flag the user gave > its environment variable > the `--config` TOML
file > the field's default. The CLI passes only the flags the user gave, so an environment variable
is never overridden by a flag's default. A bad value or an unknown key raises `InvalidSettings`
naming the flag, the variable, or the file and key it came from.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsError

from coop.errors import InvalidSettings

S = TypeVar("S", bound=BaseSettings)

DEFAULT = "default"


@dataclass(frozen=True)
class Resolved(Generic[S]):
    """Settings and, for every field, its source: "flag --x", "env COOP_…", "file PATH" or "default"."""

    settings: S
    sources: dict[str, str]


def env_name(model: type[BaseSettings], name: str) -> str:
    return f"{model.model_config.get('env_prefix', '')}{name}".upper()


def flag_name(field: FieldInfo, name: str) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return str(extra.get("flag") or "--" + name.replace("_", "-"))


def field_extra(field: FieldInfo, key: str) -> Any:
    return field.json_schema_extra.get(key) if isinstance(field.json_schema_extra, dict) else None


def resolve(model: type[S], flags: Mapping[str, Any], config_file: Path | None) -> Resolved[S]:
    """`flags`: only the values the user gave, by field name. The environment is pydantic-settings' own read."""
    present = {key.upper() for key in os.environ}
    in_env = {name for name in model.model_fields if env_name(model, name) in present}
    from_file = read_config_file(model, config_file) if config_file is not None else {}
    file_used = {k: v for k, v in from_file.items() if k not in in_env and k not in flags}
    sources = {name: _source(model, name, flags, in_env, file_used, config_file) for name in model.model_fields}
    try:
        settings = model(**file_used, **flags)
    except ValidationError as exc:
        raise InvalidSettings(_describe(model, exc, sources)) from exc
    except SettingsError as exc:  # an environment variable that is not valid JSON for a list
        raise InvalidSettings(_cause(model, exc)) from exc
    return Resolved(settings, sources)


def read_config_file(model: type[BaseSettings], path: Path) -> dict[str, Any]:
    """The TOML file's keys, each a field of `model`: an unknown key is an error, not ignored."""
    try:
        values = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InvalidSettings(f"{path}: cannot read the config file ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidSettings(f"{path}: not valid TOML: {exc}") from exc
    for key in values:
        if key not in model.model_fields:
            raise InvalidSettings(f"{path}: unknown setting {key!r} (the settings are in docs/configuration.md)")
    return values


def _source(
    model: type[BaseSettings],
    name: str,
    flags: Mapping[str, Any],
    in_env: set[str],
    file_used: Mapping[str, Any],
    config_file: Path | None,
) -> str:
    if name in flags:
        return f"flag {flag_name(model.model_fields[name], name)}"
    if name in in_env:
        return f"env {env_name(model, name)}"
    if name in file_used:
        return f"file {config_file}"
    return DEFAULT


def _describe(model: type[BaseSettings], exc: ValidationError, sources: Mapping[str, str]) -> str:
    """One line: the first error, named the way the user gave the value."""
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else ""
    field = model.model_fields.get(name)
    if field is None:
        return f"{name}: {error['msg']}"
    if error["type"] == "missing":
        return (
            f"{name} is required: give {flag_name(field, name)}, set {env_name(model, name)} "
            f"or put {name} in a --config file"
        )
    source = sources.get(name, DEFAULT)
    kind, _, where = source.partition(" ")
    at = {"flag": where, "env": where, "file": f"{where}: {name}"}.get(kind, name)
    return f"{at}: {error['msg']} (got {error.get('input')!r})"


def _cause(model: type[BaseSettings], exc: SettingsError) -> str:
    match = re.search(r'field "(\w+)" from source "\w+"', str(exc))
    if match is None:
        return str(exc)
    return f'{env_name(model, match.group(1))}: a list is given as JSON, e.g. \'["a", "b"]\''
