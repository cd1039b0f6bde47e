"""What an admin can change from the view, each change recorded in the ledger's append-only audit log."""

from __future__ import annotations

from coop.admin.context import AdminContext
from coop.errors import InvalidInput
from coop.ledger.grants import AdminSigner
from coop.ledger.models import Grant
from coop.pool.api_keys import ApiKeyRecord, api_key_digest
from coop.pool.registry import create_api_key, list_members, revoke_api_key


def grant(ctx: AdminContext, actor: str, institution: str, credits: float, reason: str) -> Grant:
    """Credits from the pool account (negative: taken back); the ledger writes the audit event itself."""
    known = {m.institution for m in list_members(ctx.pool_dir)} | {b.institution for b in ctx.ledger.balances()}
    if institution not in known:
        raise InvalidInput(f"no institution {institution!r} in this pool or its ledger")
    signer = AdminSigner.load(ctx.pool_dir)  # grants are signed with the pool CA key, which the pool directory holds
    return ctx.ledger.grant(institution, credits, reason=reason, actor=actor, signer=signer)


def create_key(ctx: AdminContext, actor: str, institution: str) -> str:
    """A new API key for a member; the caller shows it once, only its sha256 is kept."""
    key = create_api_key(ctx.pool_dir, institution)
    ctx.ledger.record(actor, "api_key_created", institution, f"key {api_key_digest(key)[:12]}")
    return key


def revoke_key(ctx: AdminContext, actor: str, sha256: str) -> ApiKeyRecord:
    """Revoke one key (the coordinator's gate re-reads the key file: it stops working at its next request)."""
    record = revoke_api_key(ctx.pool_dir, sha256)
    note = " (already revoked)" if record.revoked else ""
    ctx.ledger.record(actor, "api_key_revoked", record.institution, f"key {sha256[:12]}{note}")
    return record


def signed_in(ctx: AdminContext, actor: str, client: str) -> None:
    ctx.ledger.record(actor, "admin_signed_in", "", f"from {client}")


def signed_out(ctx: AdminContext, actor: str, client: str) -> None:
    ctx.ledger.record(actor, "admin_signed_out", "", f"from {client}")
