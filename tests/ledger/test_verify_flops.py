"""`coop ledger verify` recomputes every receipt's FLOPs from its model's manifest, and a revocation's
cutoff is the time of that revocation, not of the newest list.

The inflated receipt is booked the way a coordinator with a lying (or buggy) FLOPs table would book
it: signed by the node, countersigned by a coordinator of the pool, so every signature checks out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from coop.cli import app
from coop.errors import ReceiptRejected
from coop.ledger.verify import PoolTrust, verify_ledger
from coop.pool.registry import revoke_member
from coop.pool.revocation import RevocationList
from tests.ledger.conftest import MODEL_HASH, Receipts, span_flops_per_token

INFLATED_FLOPS = 4 * 10**18
NUM_BLOCKS = 30


@dataclass(frozen=True)
class Spans:
    """The manifest of the test model, as verify reads one."""

    num_blocks: int = NUM_BLOCKS

    def span_flops_per_token(self, start: int, end: int) -> int:
        return span_flops_per_token(start, end)


def _book_inflated(receipts: Receipts) -> str:
    seen = receipts.observe("alpha", "coord", prefill_tokens=0, decode_tokens=1)
    lying = receipts.checker(span_flops_per_token=lambda start, end: INFLATED_FLOPS)
    body = receipts.body(seen, flops=INFLATED_FLOPS)
    receipts.ledger.book([lying.check(receipts.sign(body))])
    return body.receipt_id


def test_verify_names_a_receipt_whose_flops_the_manifest_does_not_give(receipts: Receipts) -> None:
    receipts.ledger.book([receipts.booking("alpha", "coord")])  # an honest one alongside
    inflated = _book_inflated(receipts)

    report = verify_ledger(receipts.ledger, PoolTrust.load(receipts.pool.directory, {MODEL_HASH: Spans()}))
    assert len(report.problems) == 1, report.problems
    assert inflated in report.problems[0] and str(INFLATED_FLOPS) in report.problems[0]
    assert report.unchecked_models == {}

    unchecked = verify_ledger(receipts.ledger, PoolTrust.load(receipts.pool.directory))
    assert unchecked.unchecked_models == {MODEL_HASH: 2}


def test_verify_names_blocks_the_model_does_not_have(receipts: Receipts) -> None:
    seen = receipts.observe("alpha", "coord", blocks=(20, 40))
    receipts.ledger.book([receipts.checker().check(receipts.sign(receipts.body(seen)))])
    report = verify_ledger(receipts.ledger, PoolTrust.load(receipts.pool.directory, {MODEL_HASH: Spans()}))
    assert any("blocks 20:40 are not blocks" in p for p in report.problems), report.problems


def test_coop_ledger_verify_recomputes_flops_from_model_dirs(
    receipts: Receipts, tiny_chat_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the CLI: a receipt of a model given with --model, claiming more than its manifest gives."""
    if not receipts.ledger.engine.url.drivername.startswith("sqlite"):
        pytest.skip("the CLI finds the ledger in the pool directory: SQLite")
    from coop.model.manifest import Manifest

    manifest = Manifest.load(tiny_chat_model_dir)
    seen = receipts.observe("alpha", "coord", blocks=(0, manifest.num_blocks), prefill_tokens=0, decode_tokens=1)
    lying = receipts.checker(model_hash=manifest.content_hash, span_flops_per_token=lambda start, end: INFLATED_FLOPS)
    body = receipts.body(seen, model_hash=manifest.content_hash, flops=INFLATED_FLOPS)
    receipts.ledger.book([lying.check(receipts.sign(body))])

    monkeypatch.setenv("COOP_LEDGER_URL", str(receipts.ledger.engine.url))
    pool = str(receipts.pool.directory)
    result = CliRunner().invoke(app, ["ledger", "verify", "--pool", pool, "--model", tiny_chat_model_dir])
    assert result.exit_code == 1 and body.receipt_id in result.stderr, result.output


def test_a_later_revocation_does_not_move_an_earlier_cutoff(receipts: Receipts) -> None:
    alpha_revoked = revoke_member(receipts.pool.directory, "alpha")
    cutoff = alpha_revoked.revoked_since("alpha")
    assert cutoff is not None
    seen = receipts.observe("alpha", "coord")
    after_alpha = receipts.body(seen, started_at=cutoff + 0.01, ended_at=cutoff + 0.05)
    time.sleep(0.2)
    both_revoked = revoke_member(receipts.pool.directory, "beta")
    assert both_revoked.issued_at > after_alpha.ended_at  # the work ended before the newest list was signed

    assert both_revoked.revoked_since("alpha") == cutoff  # the newer list keeps alpha's own time
    assert revoke_member(receipts.pool.directory, "alpha").revoked_since("alpha") == cutoff  # idempotent
    checker = receipts.checker(revoked_since=both_revoked.revoked_since)
    with pytest.raises(ReceiptRejected, match="after 'alpha' was revoked"):
        checker.check(receipts.sign(after_alpha))


def test_a_list_signed_before_entries_carried_times_cuts_off_at_its_own_time() -> None:
    legacy = RevocationList.from_dict(
        {"pool_id": "p", "revoked": ["alpha"], "serials": [], "issued_at": 100.0, "signature": ""}
    )
    assert legacy.revoked_since("alpha") == 100.0 and legacy.revoked_since("beta") is None
    assert "revoked_at" not in legacy.to_dict()
