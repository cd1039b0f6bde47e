"""Flags generated from a settings model (coop.config): one per field, and `--config FILE`.

A command decorated with `settings_flags(Model)` declares a `given: GivenSettings` parameter instead
of the settings' flags, and gets only the values the user typed: a flag's absence leaves the field to
the environment, the config file or its default (coop.config_sources). The flag is the field's name
in kebab case, in the field's unit, except the two flags every `coop` command shares: `--model`
(repeatable: the first is model_dir, the others the extra models) and `--member` (member_bundle).
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import typer
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from coop.config_sources import Resolved, S, env_name, field_extra, flag_name, resolve

MODEL_FLAG = "--model"
SETTINGS_PANEL = "Settings (also COOP_* variables or --config FILE: docs/configuration.md)"
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="a TOML file of settings, keyed by field name (flags and environment variables win over it)",
    ),
]


@dataclass(frozen=True)
class GivenSettings:
    """What the user typed: the flags given, by field name, and the --config file."""

    flags: dict[str, Any]
    config_file: Path | None

    def resolve(self, model: type[S]) -> Resolved[S]:
        return resolve(model, self.flags, self.config_file)


def settings_flags(model: type[BaseSettings]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Replace the command's `given` parameter by `--config` and one flag per field of `model`."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in _parameters(command) if p.name != "given"]
        generated = _flag_parameters(model)
        config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOption)

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            config_file = kwargs.pop("config")
            typed = {p.name: kwargs.pop(p.name) for p in generated}
            command(given=GivenSettings(_given_fields(model, typed), config_file), **kwargs)

        parameters = [*own, config, *generated]
        wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]  # what Typer reads
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


def _parameters(command: Callable[..., None]) -> list[inspect.Parameter]:
    return list(inspect.signature(command, eval_str=True).parameters.values())


def _model_fields(model: type[BaseSettings]) -> tuple[str, ...]:
    """The fields `--model` sets: the default model and the list of the others."""
    return tuple(name for name, field in model.model_fields.items() if flag_name(field, name) == MODEL_FLAG)


def _flag_parameters(model: type[BaseSettings]) -> list[inspect.Parameter]:
    parameters = []
    models = _model_fields(model)
    if models:
        help_text = "a prepared model directory; repeat it to serve more than one (the first is the default)"
        option = typer.Option(MODEL_FLAG, metavar="DIR", help=help_text, rich_help_panel=SETTINGS_PANEL)
        parameters.append(_keyword("model", Annotated[list[Path] | None, option]))
    for name, field in model.model_fields.items():
        if name in models:
            continue
        flag = flag_name(field, name)
        declared = f"{flag}/--no-{flag[2:]}" if _base_type(field.annotation) is bool else flag
        option = typer.Option(declared, help=_help(model, name, field), rich_help_panel=SETTINGS_PANEL)
        parameters.append(_keyword(name, Annotated[_flag_type(field.annotation) | None, option]))
    return parameters


def _keyword(name: str, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def _given_fields(model: type[BaseSettings], typed: dict[str, Any]) -> dict[str, Any]:
    """The typed values by field name; a flag not given (None, or an empty repeatable) is left out."""
    given = {name: value for name, value in typed.items() if value is not None and value != []}
    dirs = given.pop("model", None)
    if dirs:
        first, *others = _model_fields(model)
        given[first] = dirs[0]
        if len(dirs) > 1:
            given[others[0]] = tuple(dirs[1:])
    return {name: tuple(value) if isinstance(value, list) else value for name, value in given.items()}


def _help(model: type[BaseSettings], name: str, field: FieldInfo) -> str:
    default = "" if field.default in (None, "", ()) else f"; default {field.default}"
    return f"{field.description} [{field_extra(field, 'unit')}{default}; {env_name(model, name)}]"


def _base_type(annotation: Any) -> Any:
    """`X` of `X | None`."""
    if get_origin(annotation) in (Union, types.UnionType):
        return next(arg for arg in get_args(annotation) if arg is not type(None))
    return annotation


def _flag_type(annotation: Any) -> Any:
    """The type a flag parses: a tuple field is a repeatable flag, a secret is typed as text."""
    base = _base_type(annotation)
    if get_origin(base) is tuple:
        return list[get_args(base)[0]]  # type: ignore[misc]  # a type built at run time, for Typer
    return str if base is SecretStr else base
