"""Where the ledger database is, how to connect to it, and bringing it to the current schema.

The ledger's URL is a secret of the pool admin: whoever holds it can write to the books. It is never
in pool.toml or a member bundle. A process finds it, in this order: `--ledger-url` (or the
COOP_LEDGER_URL environment variable); the 0600 file `ledger.url` in the pool directory (written by
`coop pool init --ledger-url` or `coop ledger set-url`); else the ledger is SQLite, `ledger.db` in
the pool directory.

Migrations are Alembic's and ship inside the package; `open_engine` runs them on every open.
SQLite runs in WAL mode with synchronous=FULL: a booking that returned survives a crash.
"""

from __future__ import annotations

import os
import stat
import threading
import tomllib
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError

from coop.errors import InvalidInput, LedgerError
from coop.pool.files import check_text, create_file, read_file, replace_file

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK_KEY = 0x436F6F704C6564  # "CoopLed": any constant shared by every Coop process
_MIGRATION_LOCK = threading.Lock()  # Alembic keeps the running migration in module globals
LEDGER_FILE = "ledger.db"
LEDGER_URL_FILE = "ledger.url"  # 0600 in the pool directory: the database URL, password and all


def alembic_config(engine: Engine | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    config = alembic_config()
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:  # a migration rebuilds tables others refer to; set outside any transaction, or it is ignored
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                if not sqlite:  # two processes opening a fresh ledger: one migrates, one waits
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def sqlite_url(path: Path | str) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def ledger_location(explicit: str | None, directory: Path, *, pool_dir: bool = True) -> str:
    """The one rule for which ledger a process opens: the URL it was given, else the pool directory's
    `ledger.url`, else SQLite in `directory`. Coordinator and `coop ledger` both follow it.
    `pool_dir=False`: `directory` is not a pool directory (a coordinator without one), only SQLite is looked for."""
    if explicit:
        return explicit
    if pool_dir:
        _refuse_url_in_pool_toml(directory)
        configured = read_ledger_url(directory)
        if configured is not None:
            return configured
    return sqlite_url(directory / LEDGER_FILE)


def write_ledger_url(pool_dir: Path, url: str, *, replace: bool = False) -> Path:
    """Keep the pool's ledger URL in `ledger.url`, mode 0600 from the first byte."""
    check_text("ledger URL", url)
    path = pool_dir / LEDGER_URL_FILE
    (replace_file if replace else create_file)(path, (url + "\n").encode("utf-8"), 0o600)
    return path


def read_ledger_url(pool_dir: Path) -> str | None:
    path = pool_dir / LEDGER_URL_FILE
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_IMODE(mode) & 0o077 and os.name == "posix":
        raise LedgerError(f"{path} holds the ledger's credentials but others may read it: chmod 600 {path}")
    url = read_file(path, "ledger URL file").decode("utf-8").strip()
    if not url:
        raise InvalidInput(f"{path} is empty: write the ledger's database URL in it, or delete it to use SQLite")
    return url


def _refuse_url_in_pool_toml(pool_dir: Path) -> None:
    """pool.toml is shared with members: a pool that kept its ledger URL there must move it first."""
    try:
        doc = tomllib.loads((pool_dir / "pool.toml").read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return  # not a pool directory, or a broken one: reading the pool reports that
    if "ledger_url" in doc:
        raise LedgerError(
            f"{pool_dir / 'pool.toml'} holds the ledger URL, which every member can read. Move it: "
            f"`coop ledger set-url URL --pool {pool_dir}` (kept 0600 in {LEDGER_URL_FILE}), then delete the "
            "ledger_url line from pool.toml and change the database password: every member has seen it"
        )


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
