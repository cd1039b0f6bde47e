"""The Python SDK. `Client` talks to a coordinator over its OpenAI-compatible HTTP API."""

from coop.client.http import ApiError, ChatResult, Client, CompletionResult, Usage

__all__ = ["ApiError", "ChatResult", "Client", "CompletionResult", "Usage"]
