"""A serving process's start-up (coop.startup), each case in a fresh interpreter so that this test
process keeps its own collector and sharing strategy: collection paused until resumed, then on with
the start-up heap frozen, and on in a process forked meanwhile (the DHT peer); a DHT peer that shares
its futures' state through descriptors, with no shared-memory manager."""

from __future__ import annotations

import subprocess
import sys

_PAUSE_FORK_RESUME = """
import gc
import multiprocessing

from coop.startup import pause_collection, resume_collection

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
        "import gc; from coop.startup import resume_collection\n"
        "gc.disable(); resume_collection(); print(gc.isenabled(), gc.get_freeze_count())"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "0"]


# A real DHT peer after `share_tensors_by_descriptor`: every call sends a future's shared state to the DHT
# process (more calls than one shared buffer holds); prints what came back and the processes it started.
_DHT_BY_DESCRIPTOR = """
import psutil

from coop.startup import share_tensors_by_descriptor
from coop.swarm.directory import SwarmDirectory

share_tensors_by_descriptor()
directory = SwarmDirectory.start([])
try:
    addresses = {tuple(directory.visible_maddrs()) for _ in range(40)}
    helpers = sorted({child.name() for child in psutil.Process().children(recursive=True)})
finally:
    directory.shutdown()
print(len(addresses), "torch_shm_manager" in helpers)
"""


def test_a_dht_peer_shares_futures_without_a_memory_manager() -> None:
    done = subprocess.run([sys.executable, "-c", _DHT_BY_DESCRIPTOR], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "False"]
