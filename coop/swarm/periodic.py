"""A call repeated every few seconds in a daemon thread: re-announcing a node, re-reading revocations."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls fn every period_s until stop(). A failing call is logged and tried again next period:
    a transient DHT failure must not end a node's presence or a process's view of revocations."""

    def __init__(self, fn: Callable[[], object], period_s: float, name: str) -> None:
        self._fn = fn
        self.period_s = period_s
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self._name} already started")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._fn()
            except Exception:
                log.warning("%s failed; trying again in %.1f s", self._name, self.period_s, exc_info=True)

    def stop(self, timeout_s: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
