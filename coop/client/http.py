"""The HTTP half of the Python SDK: a small client for a Coop coordinator's OpenAI-style API.

Any OpenAI client works against a coordinator; this one adds what they drop: the exact token
ids and the route (the `coop` field), and errors as `coop` exceptions rather than HTTP codes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from coop.errors import ApiError


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class RouteHop:
    """One node of the route a completion took, and the blocks [start, end) it ran."""

    node_id: str
    endpoint: str
    start: int
    end: int
    failovers: int = 0
    institution: str = ""  # of the whole session: how many times it moved to another route


@dataclass(frozen=True)
class ChatResult:
    """One completion (chat or text): the text, the exact token ids and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    route: list[RouteHop] = field(default_factory=list)


CompletionResult = ChatResult  # `complete` returns the same shape


class Client:
    """A coordinator at base_url ("http://host:port", with or without "/v1").

    `**params` of the generation methods go into the request body as they are: max_tokens,
    temperature, top_p, top_k, seed, stop, model, ...
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60) -> None:
        root = base_url.rstrip("/")
        root = root.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=root, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- endpoints --------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def models(self) -> list[str]:
        return [str(card["id"]) for card in self._request("GET", "/v1/models")["data"]]

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        body = self._request("POST", "/v1/chat/completions", {**params, "messages": messages, "stream": False})
        choice = body["choices"][0]
        return _result(body, str(choice["message"].get("content") or ""), choice)

    def chat_stream(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[str]:
        """Text deltas as the server produces them."""
        body = {**params, "messages": messages, "stream": True}
        for chunk in self._stream("/v1/chat/completions", body):
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield str(text)

    def complete(self, prompt: str | list[int], **params: Any) -> CompletionResult:
        body = self._request("POST", "/v1/completions", {**params, "prompt": prompt, "stream": False})
        choice = body["choices"][0]
        return _result(body, str(choice.get("text") or ""), choice)

    def complete_stream(self, prompt: str | list[int], **params: Any) -> Iterator[str]:
        for chunk in self._stream("/v1/completions", {**params, "prompt": prompt, "stream": True}):
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    yield str(choice["text"])

    # -- transport --------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise transport_error(exc, self._http.base_url) from exc
        if response.status_code >= 400:
            raise http_error(response.status_code, response.text)
        data: dict[str, Any] = response.json()
        return data

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Parsed `data:` events of a server-sent-event response, up to `[DONE]`."""
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    raise http_error(response.status_code, response.read().decode("utf-8", "replace"))
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, other SSE fields
                    payload = line[len("data:") :].strip()
                    if payload == "[DONE]":
                        return
                    event: dict[str, Any] = json.loads(payload)
                    if "error" in event:
                        raise _error_from_envelope(event, status=response.status_code)
                    yield event
        except httpx.TransportError as exc:
            raise transport_error(exc, self._http.base_url) from exc


def _route_hop(hop: dict[str, Any]) -> RouteHop:
    return RouteHop(
        node_id=str(hop["node_id"]),
        institution=str(hop.get("institution", "")),
        endpoint=str(hop["endpoint"]),
        start=int(hop["start"]),
        end=int(hop["end"]),
        failovers=int(hop.get("failovers", 0)),
    )


def _result(body: dict[str, Any], text: str, choice: dict[str, Any]) -> ChatResult:
    extras = body.get("coop") or {}
    return ChatResult(
        text=text,
        token_ids=[int(t) for t in extras.get("token_ids", [])],
        finish_reason=str(choice.get("finish_reason")),
        usage=Usage(**body["usage"]),
        route=[_route_hop(hop) for hop in extras.get("route", [])],
    )


def http_error(status: int, text: str) -> ApiError:
    """A coordinator's error answer (OpenAI's envelope, or any text) as an ApiError."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return _error_from_envelope(data, status=status)
    return ApiError(text.strip() or "request failed", status=status)


def _error_from_envelope(data: dict[str, Any], *, status: int) -> ApiError:
    error = data["error"]
    return ApiError(
        str(error.get("message", "request failed")),
        status=status,
        code=error.get("code"),
        type=error.get("type"),
        param=error.get("param"),
    )


def transport_error(exc: httpx.TransportError, base_url: httpx.URL) -> ApiError:
    """The coordinator did not answer (status None)."""
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
    return ApiError(f"could not reach the coordinator at {base_url}: {exc}", status=None, code=code)
