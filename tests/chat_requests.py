"""HTTP requests the e2e and adversarial tests send a running coordinator."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx


def greedy_chat(url: str, key: str | None, question: str, max_tokens: int, *, timeout_s: float = 120) -> httpx.Response:
    """One greedy chat request (as an API key's holder, or with no key), whatever its answer."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout_s)


def stream_greedy_chat(
    url: str, question: str, max_tokens: int, key: str | None = None, model: str = "smollm2-demo"
) -> Iterator[dict[str, Any]]:
    """The chunks of one streamed greedy chat; the last one carries the "coop" extras (token ids, route)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[len("data: ") :])


def answered_chat(url: str, key: str | None, question: str, max_tokens: int, *, timeout_s: float = 120) -> Any:
    """The body of a greedy chat that must succeed."""
    response = greedy_chat(url, key, question, max_tokens, timeout_s=timeout_s)
    assert response.status_code == 200, response.text
    return response.json()


def raw_exchange(
    url: str, head: list[str], body: Iterable[bytes] = (), *, timeout_s: float
) -> tuple[int, dict[str, Any]]:
    """Send a request's head and the given body parts, no more, over a raw socket; read the answer.

    A server that waited for the rest of the body would never answer: the socket's timeout fails the test.
    """
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sock.sendall(("\r\n".join([*head, f"Host: {parts.netloc}", "", ""])).encode())
        for part in body:
            sock.sendall(part)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())
