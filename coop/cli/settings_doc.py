"""docs/configuration.md, generated from the settings models (coop.config): `python -m coop.cli.settings_doc`.

`--check` exits with status 1 when the file differs from what the models say (tests/unit/test_settings.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from coop.cli.settings_view import toml_value
from coop.config import CoordinatorSettings, DhtSettings, NodeSettings
from coop.config_sources import env_name, field_extra, flag_name

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

PROCESSES: tuple[tuple[str, type[BaseSettings]], ...] = (
    ("coop node start", NodeSettings),
    ("coop coordinator start", CoordinatorSettings),
    ("coop dht start", DhtSettings),
)

INTRO = """# Configuration

<!-- Generated from coop/config.py by `python -m coop.cli.settings_doc`; do not edit by hand. -->

Every setting of `coop node start`, `coop coordinator start` and `coop dht start` has one name, used
the same way in four places, in the same unit:

| where | form | example |
|---|---|---|
| a flag | `--` and the name in kebab case | `--cache-budget-mb 8192` |
| an environment variable | the prefix (`COOP_NODE_` …) and the name in capitals | `COOP_NODE_CACHE_BUDGET_MB=8192` |
| a TOML file given with `--config FILE` | the name as a top-level key | `cache_budget_mb = 8192` |
| the default | below | `2048` |

The first of these that sets a value wins: **flag > environment variable > config file > default**.
Two flags are shared with every other `coop` command and keep their short names: `--model`
(repeatable: the first is `model_dir`, the others `more_model_dirs` or `extra_model_dirs`) and
`--member` (`member_bundle`). A list in an environment variable is JSON, e.g.
`COOP_NODE_INITIAL_PEERS='["/ip4/192.0.2.10/tcp/31337/p2p/12D3KooW…"]'`; in a file it is a TOML array.

An unknown key or a bad value in the file stops the process before it starts, with one line naming
the file and the key. `coop node config` and `coop coordinator config` take the same options as
`start` and print the effective settings, each with where it came from (flag, env, file or default),
secrets masked, without loading a model or starting anything:

```console
$ COOP_NODE_MAX_BLOCKS=8 coop node config --config node.toml --model /var/lib/coop/models/smollm2
model_dir = "/var/lib/coop/models/smollm2"  # flag --model
max_blocks = 8  # env COOP_NODE_MAX_BLOCKS
cache_budget_mb = 8192  # file node.toml
…
```
"""


def render() -> str:
    sections = [INTRO]
    for command, model in PROCESSES:
        sections.append(_table(command, model))
    return "\n".join(sections)


def _table(command: str, model: type[BaseSettings]) -> str:
    rows = [
        f"## `{command}`\n",
        "| setting | flag | environment variable | unit | default | description |",
        "|---|---|---|---|---|---|",
    ]
    for name, field in model.model_fields.items():
        cells = (
            f"`{name}`",
            f"`{flag_name(field, name)}`",
            f"`{env_name(model, name)}`",
            str(field_extra(field, "unit")),
            _default(field.default),
            str(field.description),
        )
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def _default(value: object) -> str:
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    return f"`{toml_value(value)}`"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = DOC_PATH.read_text() if DOC_PATH.exists() else ""
        if current != text:
            print(f"{DOC_PATH} is stale: run python -m coop.cli.settings_doc", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
