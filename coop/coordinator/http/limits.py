"""What one HTTP client may make the coordinator hold or spend, and the count of what was refused.

The API key and the body's size are checked before the body is read or parsed
(`coop.coordinator.http.guard`); the rest here, on the parsed request, before it waits for a session
slot. Stop strings, messages and the prompt's characters bound the work of tokenizing a request
and of matching its stops at every token (done in worker threads, never on the event loop); prompt
tokens bound the KV cache it asks every node of its route to reserve. Each refusal is a typed
error (`RequestTooLarge`, 413; `RequestLimitExceeded`, 400) counted by its code for the admin view.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any

from coop.config import CoordinatorSettings
from coop.coordinator.http.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, GenerationRequest
from coop.errors import RequestLimitExceeded


def _default(name: str) -> Any:
    return CoordinatorSettings.model_fields[name].default


@dataclass(frozen=True)
class HttpLimits:
    """The settings of the same names (`CoordinatorSettings`), with their defaults."""

    max_request_bytes: int = _default("max_request_bytes")
    max_stop_sequences: int = _default("max_stop_sequences")
    max_stop_chars: int = _default("max_stop_chars")
    max_messages: int = _default("max_messages")
    max_prompt_chars: int = _default("max_prompt_chars")
    max_prompt_tokens: int = _default("max_prompt_tokens")  # 0: the model's context
    text_workers: int = _default("text_workers")
    max_relay_tokens_per_institution: int = _default("max_relay_tokens_per_institution")

    @classmethod
    def from_settings(cls, settings: CoordinatorSettings) -> HttpLimits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def check(self, request: GenerationRequest) -> None:
        """Refuse a request whose stops, messages or prompt are over the limits (before it is tokenized)."""
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stops) > self.max_stop_sequences:
            raise RequestLimitExceeded(
                f"{len(stops):,} stop sequences; this coordinator takes at most {self.max_stop_sequences}",
                param="stop",
            )
        if (longest := max(map(len, stops), default=0)) > self.max_stop_chars:
            raise RequestLimitExceeded(
                f"a stop sequence of {longest:,} characters; this coordinator takes at most {self.max_stop_chars}",
                param="stop",
            )
        if isinstance(request, ChatCompletionRequest):
            if len(request.messages) > self.max_messages:
                raise RequestLimitExceeded(
                    f"{len(request.messages):,} messages; this coordinator takes at most {self.max_messages:,} "
                    "per request",
                    param="messages",
                )
            self._check_chars(sum(map(_message_chars, request.messages)), "messages")
        elif isinstance(request, CompletionRequest):
            prompt = request.prompt
            if isinstance(prompt, str) or all(isinstance(p, str) for p in prompt):
                texts = [prompt] if isinstance(prompt, str) else prompt
                self._check_chars(sum(len(str(t)) for t in texts), "prompt")
            elif self.max_prompt_tokens:
                self.check_prompt_tokens(len(prompt), "prompt")

    def check_prompt_tokens(self, count: int, param: str) -> None:
        """Refuse a prompt of more than max_prompt_tokens (when set; the model's context bounds it anyway)."""
        if self.max_prompt_tokens and count > self.max_prompt_tokens:
            raise RequestLimitExceeded(
                f"the prompt has {count:,} tokens; this coordinator takes at most {self.max_prompt_tokens:,}",
                param=param,
            )

    def _check_chars(self, count: int, param: str) -> None:
        if count > self.max_prompt_chars:
            raise RequestLimitExceeded(
                f"the prompt has {count:,} characters; this coordinator takes at most {self.max_prompt_chars:,}",
                param=param,
            )


def _message_chars(message: ChatMessage) -> int:
    content = message.content
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    return sum(len(part.text or "") for part in content)


class Rejections:
    """Requests refused since the coordinator started, by error code (e.g. request_too_large)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # the admin view reads from worker threads

    def record(self, code: str) -> None:
        with self._lock:
            self._counts[code] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
