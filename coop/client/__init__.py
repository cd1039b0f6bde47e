"""The Python SDK.

`Client` talks to a coordinator over its OpenAI-compatible HTTP API; `RemoteModel` (alias
`AutoDistributedModelForCausalLM`) keeps embeddings and head in this process and steps hidden
states through a coordinator's chain relay, for research.
The remote-model names are imported on first use, so the HTTP client does not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from coop.client.http import ChatResult, Client, CompletionResult, RouteHop, Usage
from coop.errors import ApiError, ReplayUnavailable

if TYPE_CHECKING:
    from coop.client.remote_model import (
        AutoDistributedModelForCausalLM,
        InferenceSession,
        RemoteModel,
    )

_REMOTE_MODEL_NAMES = frozenset({"AutoDistributedModelForCausalLM", "InferenceSession", "RemoteModel"})

__all__ = [
    "ApiError",
    "AutoDistributedModelForCausalLM",
    "ChatResult",
    "Client",
    "CompletionResult",
    "InferenceSession",
    "RemoteModel",
    "ReplayUnavailable",
    "RouteHop",
    "Usage",
]


def __getattr__(name: str) -> Any:
    if name in _REMOTE_MODEL_NAMES:
        from coop.client import remote_model

        return getattr(remote_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
