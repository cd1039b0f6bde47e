"""One asyncio event loop in a daemon thread, so synchronous research code can drive async network code.

An async HTTP client's connections are bound to the loop that uses them, so everything network-side
lives on this loop and sync callers hand it coroutines.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from coop.errors import CoopError

T = TypeVar("T")

LOOP_STOP_TIMEOUT_S = 30.0


class LoopThread:
    """One asyncio event loop running forever in a daemon thread; sync callers submit coroutines."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run coro on the loop and wait for its result in the calling thread."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("RemoteModel's blocking methods cannot be called from its own event loop")
        if not self._thread.is_alive():
            coro.close()
            raise CoopError("this RemoteModel is closed")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in the caller: do not leave the step running
            raise

    def stop(self) -> None:
        """Cancel what is left on the loop, join its worker threads, then the loop thread; idempotent."""
        if not self._thread.is_alive():
            if not self.loop.is_closed():
                self.loop.close()
            return
        with contextlib.suppress(Exception):
            self.run(self._drain(), LOOP_STOP_TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(LOOP_STOP_TIMEOUT_S)
        if not self._thread.is_alive():
            self.loop.close()

    async def _drain(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.loop.shutdown_asyncgens()
        await self.loop.shutdown_default_executor()  # the threads asyncio.to_thread started
