"""What an operator sees: `coop --version`, `--log-format json` logs (one object per line), and the
example systemd units."""

from __future__ import annotations

import configparser
import io
import json
import logging
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import coop
from coop.cli import app
from coop.cli.log_format import JsonFormatter
from coop.launcher import start
from tests.conftest import REPO_ROOT
from tests.waiting import wait_for

SYSTEMD_DIR = Path(REPO_ROOT) / "docs" / "systemd"


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"coop {coop.__version__}"


def test_json_lines_carry_extra_fields_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("coop.test_operating")
    logger.addHandler(handler)
    try:
        logger.warning("step took %d ms", 12, extra={"session_id": "s-1", "hop": 2})
        try:
            raise ValueError("bad tensor\nsecond line")
        except ValueError:
            logger.error("step failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first.pop("timestamp").endswith("+00:00")
    assert first == {
        "level": "warning",
        "logger": "coop.test_operating",
        "message": "step took 12 ms",
        "session_id": "s-1",
        "hop": 2,
    }
    assert second["level"] == "error" and second["message"] == "step failed"
    assert "ValueError: bad tensor\nsecond line" in second["exception"]


def test_node_logs_json_lines(tiny_llama_dir: str) -> None:
    """A real node process: everything it writes is a JSON object per line, but its readiness line."""
    args = ["node", "start", "--model", tiny_llama_dir, "--blocks", "0:6", "--device", "cpu", "--log-format", "json"]
    node = start("json-node", args, "COOP_NODE_READY")
    node.stop()
    assert node.popen.returncode == 0  # a graceful shutdown, even right after the ready line
    wait_for("the node's last line to be read", lambda: any("shutting down" in line for line in node.lines), 10)
    records = [json.loads(line) for line in node.lines if not line.startswith("COOP_NODE_READY ")]
    assert all({"timestamp", "level", "logger", "message"} <= set(r) for r in records)
    daemon = [r for r in records if r["logger"] == "coop.node.daemon"]

    def record(prefix: str) -> dict[str, object]:
        (found,) = (r for r in daemon if r["message"].startswith(prefix))
        return found

    assert record("development mode")["level"] == "warning"
    loading = record("loading blocks 0:6")
    assert (loading["level"], loading["start"], loading["end"]) == ("info", 0, 6)  # extra fields
    assert record("shutting down")["level"] == "info"


@pytest.mark.parametrize(
    ("unit", "command"), [("coop-node", ("node", "start")), ("coop-coordinator", ("coordinator", "start"))]
)
def test_systemd_units_run_a_real_command_unprivileged(unit: str, command: tuple[str, str]) -> None:
    """The example units: hardened, restarted on failure, and their ExecStart parses as `coop` flags
    with every variable defined in the example environment file."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((SYSTEMD_DIR / f"{unit}.service").read_text())
    service = parser["Service"]
    assert service["User"] not in ("", "root") and service["Restart"] == "on-failure"
    assert (service["NoNewPrivileges"], service["ProtectSystem"], service["CapabilityBoundingSet"]) == (
        "yes",
        "strict",
        "",
    )
    assert service["EnvironmentFile"].endswith(".env")
    env = dict(
        line.split("=", 1)
        for line in (SYSTEMD_DIR / f"{unit}.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    exec_start = service["ExecStart"].replace("\\\n", " ").replace("\\", " ")
    used = set(re.findall(r"\$\{(\w+)\}", exec_start))
    assert used - set(env) == set()
    program, *args = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], exec_start))
    assert program.endswith("/coop") and tuple(args[:2]) == command
    group = typer.main.get_command(app)
    subcommand = group.commands[command[0]].commands[command[1]]  # type: ignore[attr-defined]
    subcommand.make_context(" ".join(command), args[2:])  # raises on an unknown flag or a bad value
