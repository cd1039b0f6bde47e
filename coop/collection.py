"""Cyclic garbage collection paused while a serving process starts, and its start-up heap frozen after.

A node's start-up imports torch, hivemind and transformers: ~700,000 objects that live as long as the
process. Every full collection their allocations trigger walks all of them again (~0.3 s each on a
2-core machine) and frees almost nothing, so with collection on the imports take ~1.2 s more CPU.
The node pauses collection before its imports and, once it serves, freezes what it holds (moves it
to a generation no collection walks; the few thousand start-up objects already garbage stay) and
resumes: later collections, mid-serving, skip those 0.3 s too. This is the pattern that the
documentation of `gc.freeze` describes for processes that fork: a process forked while collection
is paused (the DHT peer) freezes the parent's heap before the fork and collects again from its start.
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


def _freeze_before_fork() -> None:
    if _paused:
        gc.freeze()  # the child's collections then leave the shared pages unwritten


def _collect_in_child() -> None:
    global _paused
    if _paused:
        gc.enable()
        _paused = False


os.register_at_fork(before=_freeze_before_fork, after_in_child=_collect_in_child)
