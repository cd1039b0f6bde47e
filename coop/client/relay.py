"""The SDK's end of a coordinator's chain relay: one session's hidden states over HTTP.

`RelayChain` is a `coop.pipeline.generation.Chain`, so `RemoteModel.generate` runs the very
decoding loop the coordinator and the reference path run. The coordinator holds the route, fails
over and bills the API key's institution; this side sends the states and checks what comes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import torch
from google.protobuf.message import DecodeError

from coop.client.http import http_error, transport_error
from coop.errors import ApiError, ReplayUnavailable
from coop.swarm.routing import Hop
from coop.wire.generated import coop_pb2 as pb
from coop.wire.tensors import tensor_from_proto, tensor_to_proto

SESSIONS_PATH = "/v1/coop/sessions"
BINARY = "application/octet-stream"  # a serialized protobuf message


class RelayChain:
    """One relay session of at most max_length tokens; `open()` it, step it, `close()` it."""

    def __init__(
        self, http: httpx.AsyncClient, *, model_hash: str, hidden_size: int, dtype: torch.dtype, max_length: int
    ) -> None:
        self.http = http
        self.model_hash = model_hash
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.max_length = max_length
        self.session_id = ""
        self.hops: list[Hop] = []  # as of the last open() or refresh()
        self.failovers = 0
        self.draft_tokens = 0  # one-token steps: the coordinator takes only the session's next position

    async def open(self) -> RelayChain:
        body = {"max_length": self.max_length, "model_hash": self.model_hash}
        response = await self._request("POST", SESSIONS_PATH, json=body)
        self._update(response.json())
        return self

    async def refresh(self) -> None:
        """Ask the coordinator for the session's route now (it changes on failover)."""
        self._update((await self._request("GET", f"{SESSIONS_PATH}/{self.session_id}")).json())

    async def step(self, hidden: torch.Tensor, start_position: int, token_ids: Sequence[int]) -> torch.Tensor:
        """The `Chain` step: token_ids are the session's tokens so far, this step's included."""
        return await self.send(hidden, start_position, list(token_ids[start_position:]))

    async def send(self, hidden: torch.Tensor, start_position: int, token_ids: list[int] | None) -> torch.Tensor:
        """Hidden states [1, n, hidden] at start_position (and their n token ids, or None) -> the last block's."""
        message = pb.RelayStep(
            hidden=tensor_to_proto(hidden.to(self.dtype)), start_position=start_position, token_ids=token_ids or []
        )
        response = await self._request(
            "POST",
            f"{SESSIONS_PATH}/{self.session_id}/steps",
            content=message.SerializeToString(),
            headers={"Content-Type": BINARY},
        )
        try:
            answer = pb.Tensor.FromString(response.content)
        except DecodeError as exc:
            raise ApiError(
                f"the coordinator's answer is not a serialized Tensor: {exc}", status=response.status_code
            ) from exc
        return tensor_from_proto(
            answer,
            expected_dtype=self.dtype,
            expected_shape=(1, hidden.shape[1], self.hidden_size),
            name="hidden states from the coordinator",
        )

    async def close(self) -> None:
        """Release the session's KV caches on its route; a session the coordinator already ended is fine."""
        if not self.session_id:
            return
        try:
            await self._request("DELETE", f"{SESSIONS_PATH}/{self.session_id}")
        except ApiError as exc:
            if exc.status != 404:
                raise

    def _update(self, info: dict[str, Any]) -> None:
        self.session_id = str(info["session_id"])
        self.failovers = int(info["failovers"])
        self.hops = [
            Hop(str(hop["node_id"]), str(hop["endpoint"]), int(hop["start"]), int(hop["end"])) for hop in info["route"]
        ]

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise transport_error(exc, self.http.base_url) from exc
        if response.status_code >= 400:
            error = http_error(response.status_code, response.text)
            if error.code == "replay_unavailable":  # the coordinator's ReplayUnavailable, as the SDK's own
                raise ReplayUnavailable(error.message) from error
            raise error
        return response
