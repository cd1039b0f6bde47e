"""Secret-file helpers for the pool directory: created 0600 from the first byte, never overwritten in
place, replaced atomically, read with errors that name the file, and one lock for read-modify-write."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coop.errors import InvalidInput


def check_name(what: str, name: object) -> str:
    """Institution and pool names end up in file names and certificate CNs (at most 64 UTF-8 bytes)."""
    if not isinstance(name, str) or not 1 <= len(name.encode("utf-8")) <= 64:
        raise InvalidInput(f"{what} must be 1 to 64 characters (UTF-8 bytes), got {str(name)[:80]!r}")
    if not name.isprintable() or name != name.strip():
        raise InvalidInput(f"{what} {name!r} must be printable text without leading or trailing spaces")
    if name.startswith(".") or "/" in name or "\\" in name:
        raise InvalidInput(f"{what} {name!r} may not start with '.' or contain '/' or '\\' (it names a file)")
    return name


def check_text(what: str, value: str) -> str:
    if not value or not value.isprintable():
        raise InvalidInput(f"{what} must be non-empty printable text, got {value[:80]!r}")
    return value


def create_file(path: Path, data: bytes, mode: int) -> None:
    """Create path with mode from the first byte; never overwrite (O_EXCL)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise InvalidInput(f"{path} already exists; refusing to overwrite it") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace path; the temporary file already has the final mode, so no secret leaks."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    create_file(tmp, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise InvalidInput(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def pool_lock(pool_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of the pool directory across concurrent admin commands."""
    fd = os.open(pool_dir / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def secret_digest(secret: str) -> str:
    """What the pool directory keeps of a secret (an API key, the admin token): its sha256, in hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def read_document(path: Path, what: str, expected_format: str) -> dict[str, Any]:
    """A JSON file whose "format" field names what it is; InvalidInput saying what is wrong otherwise."""
    raw = read_file(path, what)
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"{path} is not a valid {what}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != expected_format:
        found = str(doc.get("format"))[:40] if isinstance(doc, dict) else type(doc).__name__
        raise InvalidInput(f"{path} is not a valid {what}: format is {found!r}, expected {expected_format!r}")
    return doc
