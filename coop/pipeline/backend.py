"""What the HTTP API needs from "the model": a tokenizer/head and a way to open a chain of blocks.

The API (`coop.coordinator.http.serving`) only talks to a `Backend`, so the same endpoints serve the
in-process reference path (`coop.pipeline.local.LocalBackend`) and the networked pool (a remote backend that finds
nodes and builds a route per request).
"""

from __future__ import annotations

from typing import Protocol

from coop.model.client_part import ClientPart
from coop.pipeline.charge import UNMETERED, Charge
from coop.pipeline.generation import Chain


class Backend(Protocol):
    client: ClientPart  # tokenizer, chat template, embeddings/head
    model_name: str  # the name clients put in "model"
    max_context: int  # max prompt + completion tokens

    async def open_chain(self, max_length: int, charge: Charge = UNMETERED) -> Chain:
        """A fresh route/session for one request of at most max_length tokens, paid as `charge` says.

        May raise `coop.errors.RouteUnavailable` when no set of nodes covers every block.
        """
        ...
