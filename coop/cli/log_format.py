"""`--log-format text|json` for the long-running commands (node, coordinator and DHT peers).

`json` writes one object per line on stderr, for journald, Loki or any log shipper: `timestamp`
(UTC, ISO 8601), `level`, `logger`, `message`, every `extra={...}` field of the call, and
`exception` when there is one. Readiness lines (`COOP_*_READY {...}`) stay on stdout either way:
they are the launcher's protocol, not logs. Coop's own loggers log from INFO, others from
WARNING; hivemind's records (its p2p daemon's included) and Python warnings go through the same
handler.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer


class LogFormat(StrEnum):
    text = "text"
    json = "json"


LogFormatOption = Annotated[
    LogFormat,
    typer.Option(
        "--log-format", envvar="COOP_LOG_FORMAT", help="text for people, json (one object per line) for log shippers"
    ),
]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Level names of our own: hivemind renames WARNING to "WARN" for every logger of the process.
_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}
# What every LogRecord carries; anything else on a record came from `extra=` and is logged as a field.
_RECORD_FIELDS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": _LEVELS.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS and k not in entry}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(log_format: LogFormat) -> None:
    """Install the one stderr handler of this process; call before anything logs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format is LogFormat.json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("coop").setLevel(logging.INFO)
    logging.captureWarnings(True)
    if log_format is LogFormat.json:
        # hivemind prints through a handler of its own that does not propagate; send its records here
        from hivemind.utils.logging import use_hivemind_log_handler

        use_hivemind_log_handler("nowhere")
