"""What a serving process does first, to be serving sooner: no cyclic collection while it starts, and
no shared-memory manager process to wait for.

Collection. A node's start-up imports torch, hivemind and transformers: ~700,000 objects that live
as long as the process. Every full collection their allocations trigger walks all of them again
(~0.3 s each on a 2-core machine) and frees almost nothing, so with collection on the imports take
~1.2 s more CPU. The node pauses collection before its imports and, once it serves, freezes what it
holds (moves it to a generation no collection walks; the few thousand start-up objects already
garbage stay) and resumes: later collections, mid-serving, skip those 0.3 s too. This is the pattern
that the documentation of `gc.freeze` describes for processes that fork: a process forked while
collection is paused (the DHT peer) freezes the parent's heap before the fork and collects again
from its start.

Shared memory. hivemind shares each future's state between a process and its DHT peer as a tiny
shared tensor, and sets torch's sharing strategy to "file_system" when imported; that strategy
starts `torch_shm_manager`, a separate program that loads libtorch (0.2 s on a quiet machine, over
1 s on a busy one), and the first future waits for it. "file_descriptor" (torch's own default on
Linux) shares the same memory through a descriptor passed over a Unix socket, with no helper process.
"""

from __future__ import annotations

import gc
import os

_paused = False


def pause_collection() -> None:
    """Stop cyclic collection until `resume_collection`; does nothing if collection is already off."""
    global _paused
    if _paused or not gc.isenabled():
        return
    gc.disable()
    _paused = True


def resume_collection() -> None:
    """Freeze the heap and collect again, if `pause_collection` stopped collecting in this process."""
    global _paused
    if not _paused:
        return
    gc.freeze()
    gc.enable()
    _paused = False


def share_tensors_by_descriptor() -> None:
    """Share tensors between processes through file descriptors; call it after importing hivemind."""
    import torch.multiprocessing  # here: importing this module must not import torch

    torch.multiprocessing.set_sharing_strategy("file_descriptor")


def _freeze_before_fork() -> None:
    if _paused:
        gc.freeze()  # the child's collections then leave the shared pages unwritten


def _collect_in_child() -> None:
    global _paused
    if _paused:
        gc.enable()
        _paused = False


os.register_at_fork(before=_freeze_before_fork, after_in_child=_collect_in_child)
