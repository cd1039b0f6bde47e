"""A TCP proxy that holds every byte for a fixed one-way delay, in each direction: a WAN hop on loopback.

Coop-free on purpose. Bytes are delayed, not throttled: each chunk is forwarded `delay_s` after it
arrived, in order, so a stream keeps its bandwidth and only gains latency. `delay_s` may be changed
while connections are open; it applies to chunks that arrive afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib

CHUNK_BYTES = 1 << 16


class DelayProxy:
    def __init__(self, target_port: int, delay_s: float = 0.0, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.host = host
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        """Listen on `port` (0: any free one); returns the port."""
        self._server = await asyncio.start_server(self._connect, self.host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _connect(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._pipe(client_reader, target_writer), self._pipe(target_reader, client_writer), return_exceptions=True
        )

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            try:
                while (item := await queue.get()) is not None:
                    due, data = item
                    await asyncio.sleep(max(due - loop.time(), 0.0))
                    sink.write(data)
                    await sink.drain()
            finally:
                with contextlib.suppress(OSError):
                    sink.close()

        delivery = asyncio.create_task(deliver())
        try:
            while data := await source.read(CHUNK_BYTES):
                queue.put_nowait((loop.time() + self.delay_s, data))
        finally:
            queue.put_nowait(None)
            await delivery
