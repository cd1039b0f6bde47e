"""Where the ledger database is, how to connect to it, and bringing it to the current schema.

Migrations are Alembic's and ship inside the package; `open_engine` runs them on every open.
SQLite runs in WAL mode with synchronous=FULL: a booking that returned survives a crash.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError

from coop.errors import LedgerError

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK_KEY = 0x436F6F704C6564  # "CoopLed": any constant shared by every Coop process
_MIGRATION_LOCK = threading.Lock()  # Alembic keeps the running migration in module globals
LEDGER_FILE = "ledger.db"


def alembic_config(engine: Engine | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    config = alembic_config()
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":  # two processes opening a fresh ledger: one migrates, one waits
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def sqlite_url(path: Path | str) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def ledger_location(explicit: str | None, configured: str | None, directory: Path) -> str:
    """The one rule for which ledger a process opens: the URL it was given, else the pool's configured
    URL, else SQLite in `directory` (the pool directory). Coordinator and `coop ledger` both follow it."""
    return explicit or configured or sqlite_url(directory / LEDGER_FILE)


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def open_engine(url: str) -> Engine:
    """Connect and bring the schema up to date; LedgerError (password hidden) if either fails."""
    engine = _create_engine(url)
    try:
        with _MIGRATION_LOCK:
            upgrade(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise LedgerError(f"cannot open the ledger at {safe_url(url)}: {exc}") from exc
    return engine
