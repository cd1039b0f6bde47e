"""Network helpers for tests: a real HTTP server in a thread, for tests that talk to an app over the
network (httpx's tests/conftest.py:serve_in_thread), and a free port for a process to listen on."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from fastapi import FastAPI

from tests.waiting import wait_for


@contextmanager
def serve_in_thread(app: FastAPI, *, ready_timeout_s: float = 30.0) -> Iterator[str]:
    """Run uvicorn on a free 127.0.0.1 port in a thread; yields the base URL.

    The socket is bound here and handed to uvicorn, so no other process can take the port in
    between; readiness is /health answering, polled against a deadline.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def answering() -> bool:
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if not thread.is_alive():
            raise RuntimeError("the API server thread exited during startup")
        return False

    try:
        wait_for(f"the API server at {url} to answer /health", answering, ready_timeout_s, every_s=0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def free_port() -> int:
    """A 127.0.0.1 port free right now, for a process that binds it itself (it may be taken in between)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])
