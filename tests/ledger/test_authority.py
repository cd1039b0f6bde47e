"""Who may write what into the books: admin-signed grants and floors, consumers bound to API keys,
revocations and certificate expiry at booking, coordinator roles on PostgreSQL, the ledger URL kept
from members. `verify` believes only the pool directory."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlmodel import Session
from typer.testing import CliRunner

from coop.cli import app
from coop.errors import InvalidInput, LedgerError, ReceiptRejected
from coop.ledger.amounts import split
from coop.ledger.database import LEDGER_URL_FILE, ledger_location, sqlite_url
from coop.ledger.grants import AdminSigner, parse_grant
from coop.ledger.models import FLOPS_PER_CREDIT, CreditFloor
from coop.ledger.roles import create_coordinator_role
from coop.ledger.store import Ledger
from coop.ledger.verify import PoolTrust, verify_ledger
from coop.pool import ca, identity
from coop.pool.api_keys import api_key_digest
from coop.pool.bundle import MemberBundle
from coop.pool.ca import key_pem, load_cert, member_certificate
from coop.pool.registry import create_api_key, load_ca, read_revocations, revoke_member
from coop.receipts import api_key_id
from tests.ledger.conftest import Receipts
from tests.ledger_seed import insert_grant
from tests.pools import MemberPool, make_member_pool


def problems(receipts: Receipts) -> list[str]:
    return verify_ledger(receipts.ledger, PoolTrust.load(receipts.pool.directory)).problems


def key_of(pool: MemberPool, institution: str) -> str:
    """A new API key of institution, as the ledger names it."""
    return api_key_id(api_key_digest(create_api_key(pool.directory, institution)))


# -- grants and floors -------------------------------------------------------------------------


def test_grants_and_floors_carry_the_admins_signature_and_verify(receipts: Receipts, admin: AdminSigner) -> None:
    ledger = receipts.ledger
    grant = ledger.grant("alpha", "2.5", reason="welcome", actor="admin (cli)", signer=admin)
    ledger.set_credit_floor("alpha", -10, actor="admin (cli)", signer=admin)
    ledger.set_credit_floor("alpha", None, actor="admin (cli)", signer=admin)
    ledger.book([receipts.booking("alpha", "coord")])

    body = parse_grant(grant.body)
    assert (body.institution, body.amount, body.pool_id) == ("alpha", 5 * FLOPS_PER_CREDIT // 2, receipts.pool.pool_id)
    report = verify_ledger(ledger, PoolTrust.load(receipts.pool.directory))
    assert report.ok, report.problems
    assert (report.grants, report.floors, report.receipts) == (1, 2, 1)


def _forged_grants(pool: MemberPool, tmp_path: Path) -> dict[str, Callable[[str], tuple[int, bytes, bytes]]]:
    """grant id -> (FLOPs stored, body, signature) of a grant nobody authorised."""
    admin = AdminSigner.load(pool.directory)
    member_key = serialization.load_pem_private_key(pool["alpha"].key_pem, password=None)
    assert isinstance(member_key, ec.EllipticCurvePrivateKey)
    member = AdminSigner(pool.pool_id, member_key)
    other_pool = AdminSigner.load(make_member_pool(tmp_path / "other", "other", members=()).directory)
    million = 10**6 * FLOPS_PER_CREDIT

    def signed_by(signer: AdminSigner, flops: int) -> Callable[[str], tuple[int, bytes, bytes]]:
        def make(grant_id: str) -> tuple[int, bytes, bytes]:
            body, signed = signer.grant("alpha", flops, reason="sign-up credit", granted_by="admin (cli)")
            return million, signed.body.replace(body.grant_id.encode(), grant_id.encode()), signed.signature

        return make

    return {
        "unsigned": lambda _: (million, b"", b""),
        "signed by a member's key": signed_by(member, million),
        "signed by another pool's admin": signed_by(other_pool, million),
        "an admin-signed grant of 1 credit, stored as a million": signed_by(admin, FLOPS_PER_CREDIT),
    }


FORGED_GRANTS = [
    "unsigned",
    "signed by a member's key",
    "signed by another pool's admin",
    "an admin-signed grant of 1 credit, stored as a million",
]


@pytest.mark.parametrize("forgery", FORGED_GRANTS)
def test_a_grant_inserted_without_the_admins_signature_fails_verification(
    receipts: Receipts, admin: AdminSigner, tmp_path: Path, forgery: str
) -> None:
    ledger = receipts.ledger
    ledger.grant("alpha", 1, reason="welcome", actor="admin (cli)", signer=admin)
    honest = receipts.booking("alpha", "coord")
    ledger.book([honest])
    flops, body, signature = _forged_grants(receipts.pool, tmp_path)[forgery]("f" * 32)

    insert_grant(ledger, "alpha", flops, body, signature, "f" * 32)

    found = problems(receipts)
    assert found and all(f"grant {'f' * 32}" in p for p in found), found
    alpha = ledger.balance("alpha")
    assert alpha is not None and alpha.contributed_flops == honest.payment.flops  # honest bookings intact


def test_a_floor_inserted_without_the_admins_signature_fails_verification(
    receipts: Receipts, admin: AdminSigner
) -> None:
    ledger = receipts.ledger
    ledger.set_credit_floor("beta", -1, actor="admin (cli)", signer=admin)
    hi, lo = split(-(10**24))
    with Session(ledger.engine) as session, session.begin():
        session.add(CreditFloor(institution="beta", floor_hi=hi, floor_lo=lo, set_by="x", body=b"", signature=b""))

    assert ledger.credit_state("beta")[1] == -(10**24)  # the forged floor is in force...
    [problem] = problems(receipts)  # ...and verify says so
    assert "credit floor" in problem and "not signed by the pool admin" in problem


# -- consumers bound to API keys -----------------------------------------------------------------

CHARGES = {  # consumer, whose key admitted the session ("" = no key), ok?
    "the key's owner": ("beta", "beta", True),
    "the coordinator's own institution, without a key": ("coord", "", True),
    "another institution's key": ("beta", "alpha", False),
    "no key, someone else": ("beta", "", False),
    "a key the pool never issued": ("beta", "unknown", False),
}


@pytest.mark.parametrize("charge", list(CHARGES))
def test_verify_charges_a_receipt_only_to_the_owner_of_the_api_key_that_admitted_it(
    receipts: Receipts, charge: str
) -> None:
    consumer, key_owner, ok = CHARGES[charge]
    key = {"": "", "unknown": "feedfacefeedface"}.get(key_owner)
    if key is None:
        key = key_of(receipts.pool, key_owner)
    booking = receipts.booking("alpha", consumer, api_key_id=key)
    receipts.ledger.book([booking])

    found = problems(receipts)

    assert not found if ok else len(found) == 1 and f"charges {consumer!r}" in found[0], found
    assert booking.payment.api_key_id == key and receipts.ledger.receipts()[0].api_key_id == key


def test_a_countersignature_cannot_be_moved_to_another_consumer(receipts: Receipts) -> None:
    beta_key = key_of(receipts.pool, "beta")
    booking = receipts.booking("alpha", "beta", api_key_id=beta_key)
    receipts.ledger.book([booking])
    with receipts.ledger.engine.begin() as connection:  # the consumer column rewritten after booking
        connection.execute(text("INSERT INTO institutions (name, created_at) VALUES ('gamma', CURRENT_TIMESTAMP)"))
        connection.execute(text("UPDATE receipts SET consumer = 'gamma'"))

    assert any("signature does not match" in p for p in problems(receipts))


# -- revocations and expiry at booking -----------------------------------------------------------


def test_a_revoked_provider_is_paid_for_work_before_its_revocation_not_after(receipts: Receipts) -> None:
    before = receipts.observe("alpha", "coord")
    body_before = receipts.body(before, started_at=time.time() - 20, ended_at=time.time() - 10)
    revocations = revoke_member(receipts.pool.directory, "alpha")
    after = receipts.observe("alpha", "coord", node_id="n2")
    body_after = receipts.body(after)
    checker = receipts.checker(revoked_since=revocations.revoked_since)

    receipts.ledger.book([checker.check(receipts.sign(body_before))])
    with pytest.raises(ReceiptRejected, match="after 'alpha' was revoked"):
        checker.check(receipts.sign(body_after))

    assert [r.receipt_id for r in receipts.ledger.receipts()] == [body_before.receipt_id]
    assert problems(receipts) == [] and read_revocations(receipts.pool.info).revoked == ("alpha",)


def _short_lived_alpha(pool: MemberPool, not_before: dt.datetime, not_after: dt.datetime) -> MemberBundle:
    """alpha's bundle with a certificate valid only from not_before to not_after."""
    ca_key, ca_cert = load_ca(pool.info)
    lifetime = not_after - not_before - ca.CLOCK_SKEW
    with (
        mock.patch.object(ca, "utc_now", lambda: not_before + ca.CLOCK_SKEW),
        mock.patch.object(ca, "MEMBER_VALIDITY", lifetime),
    ):
        key, cert = member_certificate(ca_key, ca_cert, pool.pool_id, "alpha")
    alpha = pool["alpha"]
    return MemberBundle(
        alpha.pool_id,
        alpha.pool_name,
        "alpha",
        alpha.ca_cert_pem,
        cert.public_bytes(serialization.Encoding.PEM),
        key_pem(key),
    )


def test_a_certificate_accepted_once_is_refused_for_work_after_it_expired(receipts: Receipts) -> None:
    now = dt.datetime.now(dt.UTC)
    alpha = _short_lived_alpha(receipts.pool, now - dt.timedelta(minutes=4), now - dt.timedelta(minutes=1))
    assert load_cert(alpha.cert_pem, "test").not_valid_after_utc < now
    checker = receipts.checker()
    seen = receipts.observe("alpha", "coord")
    in_time = receipts.body(seen, started_at=now.timestamp() - 160, ended_at=now.timestamp() - 150)
    late = receipts.body(receipts.observe("alpha", "coord", node_id="n2"))

    then = now - dt.timedelta(minutes=2)  # alpha's node made its certificate while alpha's was valid
    with mock.patch.object(ca, "utc_now", lambda: then), mock.patch.object(identity, "utc_now", lambda: then):
        early, later = receipts.sign(in_time, signer=alpha), receipts.sign(late, signer=alpha)
    receipts.ledger.book([checker.check(early)])  # checked, and remembered
    with pytest.raises(ReceiptRejected, match="certificate expired"):
        checker.check(later)
    assert [r.receipt_id for r in receipts.ledger.receipts()] == [in_time.receipt_id]
    assert problems(receipts) == []


# -- coordinator roles on PostgreSQL ------------------------------------------------------------

FORBIDDEN_TO_A_COORDINATOR = [
    "UPDATE postings SET amount_hi = amount_hi + 1",
    "DELETE FROM postings",
    "UPDATE receipts SET consumer = provider",
    "DELETE FROM receipts",
    "INSERT INTO grants (grant_id, institution, amount_hi, amount_lo, reason, granted_by, created_at, body, signature)"
    " VALUES ('g', 'alpha', 1, 0, 'r', 'me', CURRENT_TIMESTAMP, '', '')",
    "UPDATE grants SET amount_hi = 0",
    "INSERT INTO credit_floors (institution, set_by, set_at, body, signature) VALUES ('beta', 'me', now(), '', '')",
    "DELETE FROM audit_events",
    "UPDATE institutions SET name = name",
    "TRUNCATE postings",
    "DROP TABLE postings",
]


def test_a_coordinator_role_books_receipts_but_cannot_rewrite_the_books(
    postgres_url: str, member_pool: MemberPool, admin: AdminSigner
) -> None:
    owner = Ledger.open(postgres_url)
    owner.grant("alpha", 1, reason="welcome", actor="admin (cli)", signer=admin)
    url = create_coordinator_role(owner.engine, "coord_eu")
    assert url is not None and "coord_eu:" in url
    coordinator = Ledger.open(url)
    try:
        receipts = Receipts(member_pool, coordinator)
        booked = coordinator.book([receipts.booking("alpha", "coord"), receipts.booking("beta", "coord", node_id="n2")])
        coordinator.record("coordinator:coord", "receipt_rejected", "r1", "what a coordinator writes")
        assert len(booked) == 2 and len(owner.receipts()) == 2
        for statement in FORBIDDEN_TO_A_COORDINATOR:
            with (
                pytest.raises(ProgrammingError, match=r"permission denied|must be owner"),
                coordinator.engine.begin() as c,
            ):
                c.execute(text(statement))
        with pytest.raises(LedgerError, match="permission denied"):
            coordinator.grant("alpha", 10, reason="to myself", actor="coordinator", signer=admin)
        assert create_coordinator_role(owner.engine, "coord_eu") is None  # again: privileges only
        assert verify_ledger(owner, PoolTrust.load(member_pool.directory)).ok
    finally:
        coordinator.close()
        owner.close()


def test_roles_are_refused_on_sqlite_and_for_odd_names(ledger: Ledger) -> None:
    if ledger.engine.dialect.name == "sqlite":
        with pytest.raises(InvalidInput, match="only on PostgreSQL"):
            create_coordinator_role(ledger.engine, "coord_eu")
        return
    with pytest.raises(InvalidInput, match="role name"):
        create_coordinator_role(ledger.engine, "coord; DROP TABLE postings")


# -- the ledger's URL is the admin's --------------------------------------------------------------


def test_the_ledger_url_is_kept_0600_in_the_pool_directory_and_never_given_to_members(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    url = "postgresql+psycopg://coop:s3cret-pw@db.internal:6543/books"
    runner = CliRunner()

    created = runner.invoke(app, ["pool", "init", str(pool), "--name", "P", "--ledger-url", url])
    added = runner.invoke(app, ["member", "add", "alpha", "--pool", str(pool)])

    assert created.exit_code == 0 and added.exit_code == 0, created.output + added.output
    assert "s3cret-pw" not in created.output
    assert os.stat(pool / LEDGER_URL_FILE).st_mode & 0o777 == 0o600
    assert ledger_location(None, pool) == url and ledger_location("sqlite:///x", pool) == "sqlite:///x"
    for shared in (pool / "pool.toml", pool / "members" / "alpha.bundle", pool / "members" / "alpha.json"):
        content = shared.read_text()
        assert not any(secret in content for secret in (url, "s3cret-pw", "db.internal", "6543")), shared

    (pool / LEDGER_URL_FILE).chmod(0o644)
    with pytest.raises(LedgerError, match="chmod 600"):
        ledger_location(None, pool)


def test_a_pool_that_kept_its_ledger_url_in_pool_toml_must_move_it(tmp_path: Path) -> None:
    pool = make_member_pool(tmp_path / "pool", members=()).directory
    assert ledger_location(None, pool) == sqlite_url(pool / "ledger.db")
    toml = pool / "pool.toml"  # as `coop pool init --ledger-url` wrote it before: at the top level
    toml.write_text('ledger_url = "postgresql+psycopg://coop:pw@db/books"\n' + toml.read_text())

    with pytest.raises(LedgerError, match="every member can read"):
        ledger_location(None, pool)
