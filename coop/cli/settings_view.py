"""Effective settings as a user reads them: `coop node|coordinator config`, and one log line at start.

The listing is TOML (a setting left unset is a comment), each line followed by where its value came
from, so it can be read, diffed, or kept as a --config file. Secrets are masked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from coop.config_sources import DEFAULT, Resolved, field_extra

logger = logging.getLogger(__name__)

MASK = "********"


def settings_lines(resolved: Resolved[Any]) -> list[str]:
    """`name = value  # source` per field, in the model's order; an unset one as `# name (unset)  # source`."""
    lines = []
    for name, field in type(resolved.settings).model_fields.items():
        value = getattr(resolved.settings, name)
        source = resolved.sources[name]
        if value is None:
            lines.append(f"# {name} (unset)  # {source}")
        else:
            shown = MASK if field_extra(field, "secret") else value
            lines.append(f"{name} = {toml_value(shown)}  # {source}")
    return lines


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, SecretStr):
        return json.dumps(value.get_secret_value())
    return json.dumps(str(value) if isinstance(value, Path) else value)


def log_effective(resolved: Resolved[Any]) -> None:
    """One line at start: every setting not at its default, and where it came from (secrets masked)."""
    changed = [line for line in settings_lines(resolved) if not line.endswith(f"# {DEFAULT}")]
    logger.info("settings not at their default: %s", "; ".join(changed) or "none")
