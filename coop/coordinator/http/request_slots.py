"""The slots a generation request holds: its API key's concurrency slot, then a session slot in
fair-share order (`coop.coordinator.accounts.fair_share_admission`) when the pool meters use."""

from __future__ import annotations

from contextlib import AsyncExitStack

from coop.coordinator.accounts.fair_share_admission import RequestAdmission
from coop.coordinator.http.auth import ApiKeyGate, Caller
from coop.pipeline.charge import Charge, Payer
from coop.receipts import api_key_id


async def enter_request(
    slots: AsyncExitStack, gate: ApiKeyGate, access: RequestAdmission | None, caller: Caller, model_hash: str
) -> tuple[Charge, float | None]:
    """Take one of caller's key slots and, when the pool meters use, a session slot in fair-share order,
    onto `slots` (closing it gives them back). Returns who pays for sessions of the model of `model_hash`,
    and the seconds waited (None: no admission).
    A chat request holds them until its response ends, a relay session until it is closed."""
    slots.enter_context(gate.slot(caller))
    if access is None:
        return Charge(Payer(caller.institution or "", model_hash=model_hash)), None
    key_id = api_key_id(caller.key_digest) if caller.key_digest else ""
    admitted = await slots.enter_async_context(access.enter(caller.institution, key_id, model_hash))
    return admitted.charge, admitted.waited_s
