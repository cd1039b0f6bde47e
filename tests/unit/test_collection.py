"""Collection paused for a node's start-up: off until resumed, then on with the start-up heap frozen;
a process forked meanwhile (the DHT peer) collects from its start. Run in a fresh interpreter, so
that this test process keeps its own collector as it is."""

from __future__ import annotations

import subprocess
import sys

_PAUSE_FORK_RESUME = """
import gc
import multiprocessing

from coop.collection import pause_collection, resume_collection

pause_collection()
paused = gc.isenabled()
fork = multiprocessing.get_context("fork")
child_says = fork.SimpleQueue()
child = fork.Process(target=lambda: child_says.put(gc.isenabled()))
child.start()
child_collects = child_says.get()
child.join()
frozen_at_fork = gc.get_freeze_count()
resume_collection()
print(paused, child_collects, frozen_at_fork > 0, gc.isenabled(), gc.get_freeze_count() >= frozen_at_fork)
"""


def test_paused_for_start_up_then_frozen_and_resumed() -> None:
    done = subprocess.run([sys.executable, "-c", _PAUSE_FORK_RESUME], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True", "True", "True"]


def test_resume_leaves_a_collector_it_did_not_pause_alone() -> None:
    script = (
        "import gc; from coop.collection import resume_collection\n"
        "gc.disable(); resume_collection(); print(gc.isenabled(), gc.get_freeze_count())"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "0"]
