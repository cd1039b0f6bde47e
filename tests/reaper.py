"""Finding and ending the processes a test run started and left behind (tests/conftest.py reaps with these).

A process of this run is a descendant of the pytest process, or, once its parent is gone (a node
killed with kill -9 leaves its forked DHT process and the p2pd daemon behind, re-parented to init),
a process that inherited this run's marker in its environment: every process the tests start
inherits os.environ, and hivemind hands its environment down to p2pd.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from collections.abc import Collection, Iterable

import psutil

RUN_MARKER = "PYTEST_COOP_RUN_ID"  # not COOP_*: those are cleared for every test (_clean_coop_environ)
SETTLE_S = 1.0  # for processes already on their way out, before any signal
REAP_GRACE_S = 3.0  # after SIGTERM, then after SIGKILL
# Helpers a process starts once and keeps, which stop by themselves when it is gone. pytest's own are
# left alone (ending them early breaks multiprocessing's atexit, and torch aborts on a broken pipe to
# its shared-memory manager); those of a process that was killed are ended without a warning.
HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "torch_shm_manager")


class LeftoverProcessWarning(RuntimeWarning):
    """A test started a process and did not stop it; the reaper ended it."""


def mark_this_run() -> str:
    """Put a new marker for this run in os.environ, so that every process it starts inherits it."""
    run_id = uuid.uuid4().hex
    os.environ[RUN_MARKER] = run_id
    return run_id


def processes_of_this_run(run_id: str) -> dict[int, psutil.Process]:
    """Every live process this run started and has not ended, by pid (pytest itself excluded)."""
    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    for process in psutil.process_iter():
        if process.pid in found or process.pid == me.pid:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if process.environ().get(RUN_MARKER) == run_id:
                found[process.pid] = process
    return {pid: p for pid, p in found.items() if _live(p) and not _kept(p)}


def started_since(run_id: str, before: Collection[int], keep: Collection[int]) -> list[psutil.Process]:
    """This run's processes that are not in `before` and have no ancestor in `before` or `keep`."""
    spared = set(before) | set(keep)
    leftovers = []
    for pid, process in processes_of_this_run(run_id).items():
        if pid in spared:
            continue
        with contextlib.suppress(psutil.Error):
            if not any(parent.pid in spared for parent in process.parents()):
                leftovers.append(process)
    return leftovers


def reap(processes: Iterable[psutil.Process], where: str) -> None:
    """SIGTERM, a grace period, then SIGKILL; warns naming what had to be ended."""
    _, alive = psutil.wait_procs(list(processes), timeout=SETTLE_S)
    alive = [p for p in alive if _live(p)]  # an orphan that exited is a zombie until init reaps it
    if not alive:
        return
    described = [_describe(p) for p in alive if not _is_helper(p)]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(alive, timeout=REAP_GRACE_S)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=REAP_GRACE_S)
    if described:
        message = f"{len(described)} process(es) left running {where}, ended: " + "; ".join(described)
        warnings.warn(LeftoverProcessWarning(message), stacklevel=2)


def _live(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_helper(process: psutil.Process) -> bool:
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return any(name in command for name in HELPERS)


def _kept(process: psutil.Process) -> bool:
    """pytest's own helpers."""
    try:
        return process.ppid() == os.getpid() and _is_helper(process)
    except psutil.Error:
        return False


def _describe(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{process.pid} {' '.join(process.cmdline())[:160]}"
    with contextlib.suppress(psutil.Error):
        return f"{process.pid} {process.name()} ({process.status()}, parent {process.ppid()})"
    return str(process.pid)
