"""Which files of a model store were already hashed and found good, so a restart need not re-hash them.

Hashing every block file on every start costs a full read of the span (seconds per block of a
large model). A file that hashed to the manifest's sha256 is remembered by its stat signature:
device, inode, size, mtime and ctime in nanoseconds. Any write to the file, a replaced file, a
copied store or a `touch` back to the old mtime changes that signature (the kernel sets ctime on
every change and no user can set it back), so the file is hashed again before it is used.

What this does not catch: corruption below the filesystem (bit rot, a bad disk) and someone who
can write both the store and this record; `coop model info --verify` hashes every file
regardless. The record is `.coop-verified.json` in the store; a store that cannot be written
(read-only mount) is simply hashed on every start.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

RECORD_FILE = ".coop-verified.json"
SETTLE_S = 2.0

_lock = threading.Lock()  # loaders in one process may verify files of one store from several threads


def settled_signature(path: Path) -> str | None:
    """The file's stat signature, or None if it changed too recently for one to be trusted.

    File times tick with the kernel's coarse clock (milliseconds), so a file changed twice within
    one tick keeps its times; as in git's "racily clean" rule, a file changed within the last
    SETTLE_S seconds is always hashed.
    """
    st = path.stat()
    if time.time_ns() - st.st_ctime_ns < SETTLE_S * 1e9:
        return None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _read(model_dir: Path) -> dict[str, list[str]]:
    try:
        record = json.loads((model_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def already_verified(model_dir: Path, rel_path: str, sha256: str, signature: str) -> bool:
    """Whether rel_path hashed to sha256 before and still has the stat signature it had then."""
    return _read(model_dir).get(rel_path) == [sha256, signature]


def remember_verified(model_dir: Path, rel_path: str, sha256: str, signature: str) -> None:
    """Record that rel_path, with `signature` taken before it was hashed, hashed to sha256.

    Best effort: a store that cannot be written is hashed again next time.
    """
    with _lock:
        record = _read(model_dir)
        record[rel_path] = [sha256, signature]
        scratch = model_dir / f"{RECORD_FILE}.{uuid.uuid4().hex}"  # node processes sharing a store never collide
        try:
            scratch.write_text(json.dumps(record, indent=0, sort_keys=True))
            os.replace(scratch, model_dir / RECORD_FILE)
        except OSError:
            scratch.unlink(missing_ok=True)
