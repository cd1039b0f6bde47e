"""A throwaway PostgreSQL server for tests and benchmarks: its own data directory, port and socket.

Never the system cluster: `initdb` into a fresh temporary directory, `postgres` listening on
127.0.0.1 only (trust auth, no password), unix socket inside that directory, stopped and deleted
on exit. As root, the server runs as the `postgres` user (PostgreSQL refuses to run as root).
Binaries come from Debian's /usr/lib/postgresql/<version>/bin, else from PATH;
scripts/test-services installs them.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.http_servers import free_port
from tests.waiting import wait_for

READY_TIMEOUT_S = 30.0


class PostgresUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class PostgresServer:
    port: int
    host: str = "127.0.0.1"
    user: str = "postgres"

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL, psycopg 3 driver."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def conninfo(self, database: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={database}"

    def create_database(self) -> str:
        import psycopg

        name = f"coop_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # FORCE: a leaked connection


def bin_dir() -> Path:
    """Where initdb, postgres, pg_ctl and pg_isready are; PostgresUnavailable if nowhere."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin or on PATH: "
        "run scripts/test-services (it installs Debian's postgresql package)"
    )


@contextmanager
def postgres_server(*, durable: bool = False) -> Iterator[PostgresServer]:
    """Start a server, yield it, stop it and delete its files.

    durable=False turns off fsync and synchronous commit: fast, and fine for data thrown away.
    Benchmarks pass durable=True so a commit costs what it costs in production.
    """
    bindir = bin_dir()
    as_root = os.geteuid() == 0
    # as root, directly in /tmp (not $TMPDIR): the postgres user must be able to reach it
    root = Path(tempfile.mkdtemp(prefix="coop-pg-", dir="/tmp" if as_root else None))
    if as_root:
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "data", root / "server.log"

    def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in argv]
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd] if as_root else cmd,
            capture_output=True,
            text=True,
            check=False,
        )

    process: subprocess.Popen[bytes] | None = None
    try:
        done = run(bindir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        settings = ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}"]
        if not durable:
            settings += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        for _attempt in range(3):  # a free port can be taken between choosing it and binding it
            port = free_port()
            argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(port), *settings]
            with open(log, "ab") as log_file:
                process = subprocess.Popen(
                    ["runuser", "-u", "postgres", "--", *argv] if as_root else argv,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if _wait_ready(bindir, port, process):
                break
            process.wait(timeout=10)
            process = None
        else:
            raise PostgresUnavailable(f"postgres did not start; its log:\n{log.read_text(errors='replace')}")
        yield PostgresServer(port)
    finally:
        if process is not None:
            run(bindir / "pg_ctl", "stop", "-D", data, "-m", "fast", "-w", "-t", "30")
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(bindir: Path, port: int, process: subprocess.Popen[bytes]) -> bool:
    """True once the server accepts connections; False if it exited (e.g. the port was taken)."""

    def settled() -> str | None:
        if process.poll() is not None:
            return "exited"
        probe = subprocess.run(
            [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-t", "1"], check=False
        )
        return "ready" if probe.returncode == 0 else None

    try:
        return wait_for(f"postgres on port {port} to accept connections", settled, READY_TIMEOUT_S, 0.05) == "ready"
    except AssertionError as exc:
        raise PostgresUnavailable(str(exc)) from None
