"""Attacks on the books of a pool whose ledger is a real PostgreSQL database.

Pool "Books": Alpha's node serves blocks 0:2 and Beta's 2:4 of a tiny chat model; the pool's
coordinator (Coord) books through its own PostgreSQL role (`coop ledger create-role`); Gamma's API
key pays. The admin's database URL lives only in the pool directory's 0600 `ledger.url`.

- Attack 2, minting credits: a member looks for the ledger's credentials in what it was given, and
  a grant is written straight into the database without the admin's signature.
- Attack 3, billing another member: Beta runs a coordinator of its own (with a database role, as a
  pool coordinator has) whose key file says Beta's API key is Gamma's, so Gamma pays for Beta's use.
- Attack 7, inflating a receipt: the pool's own coordinator (holding its certificate) books a 1-token
  receipt of Alpha's node claiming 4·10^18 FLOPs, charged to Gamma's key, every signature valid.
- Attack 8: a revoked provider's receipt for work after its revocation reaches booking; grants of
  10^9 credits push every sum far past 64 bits.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError

from coop.coordinator.accounts.observations import Metering
from coop.coordinator.accounts.receipt_collection import ReceiptCollector
from coop.launcher import COOP, CoopProcess, LocalPool
from coop.ledger.booking import ReceiptChecker
from coop.ledger.fairshare import FairShare
from coop.ledger.grants import AdminSigner
from coop.ledger.models import FLOPS_PER_CREDIT, Observation
from coop.ledger.store import Ledger
from coop.model.manifest import Manifest
from coop.pool.api_keys import ApiKeyRecord, api_key_digest, api_keys_json
from coop.pool.bundle import MemberBundle
from coop.pool.registry import PoolInfo, add_member, create_api_key, read_revocations
from coop.pool.revocation import Revocations
from coop.receipts import ReceiptBody, api_key_id, new_receipt_id, sign_receipt
from coop.swarm.node_key import NodeKey
from coop.wire.channels import ChannelPool, ChannelSecurity
from coop.wire.receipts import receipt_to_proto
from tests.ledger_seed import insert_grant
from tests.pg_server import PostgresServer
from tests.waiting import wait_for

WAIT_S = 60.0
BILLION = 10**9 * FLOPS_PER_CREDIT
INFLATED_FLOPS = 4 * 10**18


@dataclass
class Books:
    pool: LocalPool
    pool_dir: Path
    bundles: dict[str, Path]
    manifest: Manifest
    owner_url: str  # the pool admin's: only in <pool>/ledger.url
    owner_password: str
    coordinator_url: str  # Coord's role
    database: str
    port: int
    keys: dict[str, str]  # institution -> its API key
    coordinator: CoopProcess

    def ledger(self) -> Ledger:
        return Ledger.open(self.owner_url)

    def chat(self, url: str, key: str, content: str) -> None:
        body = {"model": self.manifest.name, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
        response = httpx.post(
            f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        assert response.status_code == 200, response.text

    def chat_and_book(self, url: str, key: str, content: str) -> None:
        """One request, and its two receipts (one per node) booked."""
        ledger = self.ledger()
        try:
            count = len(ledger.receipts())
            self.chat(url, key, content)
            wait_for("the request's two receipts", lambda: len(ledger.receipts()) >= count + 2, WAIT_S)
        finally:
            ledger.close()

    def verify(self, *models: str) -> subprocess.CompletedProcess[str]:
        """`coop ledger verify`, recomputing the FLOPs of receipts of these model directories."""
        return coop("ledger", "verify", "--pool", str(self.pool_dir), *(f"--model={m}" for m in models))


def coop(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, as the pool admin runs it (wide enough that tables do not wrap)."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*COOP, *args], capture_output=True, text=True, timeout=180, check=False, env=env)


def create_role(pool_dir: Path, name: str) -> str:
    created = coop("ledger", "create-role", name, "--pool", str(pool_dir))
    assert created.returncode == 0, created.stdout + created.stderr
    [url] = [line.strip() for line in created.stdout.splitlines() if line.strip().startswith("postgresql")]
    return url


def problem_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("problem:")]


@pytest.fixture(scope="module")
def books(
    tiny_chat_model_dir: str, postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Books]:
    pool_dir = tmp_path_factory.mktemp("books") / "pool"
    database = postgres.create_database()
    password = "owner-" + secrets.token_hex(8)  # the test server trusts 127.0.0.1; the URL still carries it
    owner_url = f"postgresql+psycopg://postgres:{password}@{postgres.host}:{postgres.port}/{database}"
    pool = LocalPool(tiny_chat_model_dir)
    try:
        created = coop("pool", "init", str(pool_dir), "--name", "Books", "--ledger-url", owner_url)
        assert created.returncode == 0, created.stdout + created.stderr
        bundles = {name: add_member(pool_dir, name) for name in ("Alpha", "Beta", "Gamma")}
        bundles["Coord"] = add_member(pool_dir, "Coord", role="coordinator")
        keys = {name: create_api_key(pool_dir, name) for name in ("Gamma", "Beta")}
        coordinator_url = create_role(pool_dir, "coord_books")
        pool.start_dht()
        pool.start_nodes({"node-a": "0:2", "node-b": "2:4"}, {"node-a": bundles["Alpha"], "node-b": bundles["Beta"]})
        coordinator = pool.start_coordinator(
            member=bundles["Coord"],
            api_keys=pool_dir / "api_keys.json",
            extra_args=["--ledger-url", coordinator_url, "--receipt-interval-s", "0.3"],
        )
        books = Books(
            pool,
            pool_dir,
            bundles,
            Manifest.load(tiny_chat_model_dir),
            owner_url,
            password,
            coordinator_url,
            database,
            postgres.port,
            keys,
            coordinator,
        )
        books.chat_and_book(coordinator.ready["url"], keys["Gamma"], "Open the books.")
        yield books
    finally:
        pool.stop()
        postgres.drop_database(database)


def test_attack_2_a_member_finds_no_ledger_credential_and_an_unsigned_grant_fails_verify(books: Books) -> None:
    # What members are given: pool.toml, their bundle, the public member records.
    members = books.pool_dir / "members"
    shared = [books.pool_dir / "pool.toml", *members.glob("*.bundle"), *members.glob("*.json")]
    needles = [books.owner_url, books.owner_password, f":{books.port}", books.database, books.coordinator_url]
    for path in shared:
        content = path.read_text()
        for needle in needles:
            assert needle not in content, f"{path.name} gives members {needle!r}"
    assert set(json.loads(books.bundles["Beta"].read_text())["pool"]) == {"pool_id", "name", "bootstrap", "limits"}
    assert (books.pool_dir / "ledger.url").stat().st_mode & 0o777 == 0o600

    ledger = books.ledger()
    try:
        honest = {b.institution: b.balance_flops for b in ledger.balances()}
        # A coordinator's role cannot write a grant at all...
        role = create_engine(books.coordinator_url)
        with pytest.raises(ProgrammingError, match="permission denied"), role.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO grants (grant_id, institution, amount_hi, amount_lo, reason, granted_by, "
                    "created_at, body, signature) VALUES ('x', 'Beta', 1, 0, 'r', 'me', now(), '', '')"
                )
            )
        role.dispose()
        # ...and one written with the owner's access (stolen, say) has no valid admin signature.
        beta = MemberBundle.load(books.bundles["Beta"])  # the best a member can do: sign with its own key
        beta_key = serialization.load_pem_private_key(beta.key_pem, password=None)
        assert isinstance(beta_key, ec.EllipticCurvePrivateKey)
        _, self_signed = AdminSigner(beta.pool_id, beta_key).grant(
            "Beta", BILLION, reason="sign-up credit", granted_by="admin (cli)"
        )
        forged = {"a" * 32: (b"", b""), "b" * 32: (self_signed.body, self_signed.signature)}
        for grant_id, (body, signature) in forged.items():
            insert_grant(ledger, "Beta", BILLION, body, signature, grant_id)

        result = books.verify()

        assert result.returncode == 1, result.stdout + result.stderr
        found = problem_lines(result)
        assert found and all(any(grant_id in line for grant_id in forged) for line in found), found
        assert all(any(grant_id in line for line in found) for grant_id in forged)
        balances = {b.institution: b.balance_flops for b in ledger.balances()}
        assert {name: balances[name] for name in honest if name != "Beta"} == {
            name: flops for name, flops in honest.items() if name != "Beta"
        }
        assert balances["Beta"] == honest["Beta"] + 2 * BILLION  # what verify flags

        # The honest pool keeps booking; with the forgeries gone the books verify again.
        books.chat_and_book(books.coordinator.ready["url"], books.keys["Gamma"], "Still open?")
        with ledger.engine.begin() as connection:
            for grant_id in forged:
                connection.execute(text("DELETE FROM postings WHERE grant_id = :g"), {"g": grant_id})
                connection.execute(text("DELETE FROM grants WHERE grant_id = :g"), {"g": grant_id})
        clean = books.verify()
        assert clean.returncode == 0, clean.stdout + clean.stderr
    finally:
        ledger.close()


def test_attack_3_a_coordinator_that_bills_another_member_is_caught_by_verify(books: Books, tmp_path: Path) -> None:
    rogue_keys = tmp_path / "api_keys.json"  # Beta's own key, said to be Gamma's
    record = ApiKeyRecord(api_key_digest(books.keys["Beta"]), "Gamma", time.time())
    rogue_keys.write_bytes(api_keys_json([record]))
    rogue_keys.chmod(0o600)
    ledger_url = create_role(books.pool_dir, "coord_beta")
    extra_args = ["--ledger-url", ledger_url, "--receipt-interval-s", "0.3"]
    # With its member bundle, Beta cannot run a coordinator at all: only the pool CA issues that role.
    with pytest.raises(RuntimeError, match="coordinator bundle"):
        books.pool.start_coordinator(member=books.bundles["Beta"], api_keys=rogue_keys, extra_args=extra_args)
    # Even a coordinator the pool did certify (Beta's, gone rogue) cannot choose who pays.
    rogue_bundle = add_member(books.pool_dir, "Beta", role="coordinator")
    rogue = books.pool.start_coordinator(member=rogue_bundle, api_keys=rogue_keys, extra_args=extra_args)
    ledger = books.ledger()
    try:
        gamma_before = ledger.balance("Gamma")
        assert gamma_before is not None
        books.chat_and_book(rogue.ready["url"], books.keys["Beta"], "Charge this to Gamma.")
        billed = [r for r in ledger.receipts() if ReceiptBody.from_bytes(r.body).coordinator == "Beta"]
        assert len(billed) == 2 and {r.consumer for r in billed} == {"Gamma"}  # booked: the attack went through
        beta_key = api_key_id(api_key_digest(books.keys["Beta"]))

        result = books.verify()

        assert result.returncode == 1, result.stdout + result.stderr
        found = problem_lines(result)
        assert len(found) == 2, found
        for receipt in billed:
            [line] = [line for line in found if receipt.receipt_id in line]
            assert f"charges 'Gamma' through API key {beta_key}, which is 'Beta''s" in line
        # The honest coordinator's bookings are untouched and it keeps booking.
        books.chat_and_book(books.coordinator.ready["url"], books.keys["Gamma"], "Honest again.")
        assert books.verify().stderr.count("problem:") == 2
        with ledger.engine.begin() as connection:
            for receipt in billed:
                connection.execute(text("DELETE FROM postings WHERE receipt_id = :r"), {"r": receipt.receipt_id})
                connection.execute(text("DELETE FROM receipts WHERE receipt_id = :r"), {"r": receipt.receipt_id})
        clean = books.verify()
        assert clean.returncode == 0, clean.stdout + clean.stderr
    finally:
        rogue.stop()
        books.pool.processes.remove(rogue)
        ledger.close()


def test_attack_7_a_coordinator_that_inflates_a_receipts_flops_is_named_by_verify(books: Books) -> None:
    """Coord books as if its FLOPs table said 4·10^18 per token: the receipt passes booking (Coord's own
    check is the lie), and only `verify --model` recomputing from the manifest can name it."""
    alpha = MemberBundle.load(books.bundles["Alpha"])
    coordinator = MemberBundle.load(books.bundles["Coord"])
    gamma_key = api_key_id(api_key_digest(books.keys["Gamma"]))
    ledger = books.ledger()
    try:
        session_id, now = new_receipt_id(), time.time()
        ledger.observe(
            [Observation(session_id=session_id, node_id="node-a", provider="Alpha", consumer="Gamma",
                         start_block=0, end_block=2, prefill_tokens=0, decode_tokens=1, api_key_id=gamma_key)]
        )  # fmt: skip
        inflated = ReceiptBody(
            new_receipt_id(), alpha.pool_id, session_id, "node-a", "Alpha", "Coord",
            books.manifest.content_hash, 0, 2, 0, 1, INFLATED_FLOPS, now - 1, now,
        )  # fmt: skip
        lying = ReceiptChecker(
            coordinator.pool_id,
            coordinator.ca_cert_pem,
            books.manifest.content_hash,
            lambda start, end: INFLATED_FLOPS,
            coordinator,
            ledger.observation,
            ledger.booked_for,
        )
        ledger.book([lying.check(sign_receipt(alpha.credentials("node-a"), inflated))])
        [booked] = [r for r in ledger.receipts() if r.receipt_id == inflated.receipt_id]
        assert booked.consumer == "Gamma"  # booked and charged: the attack went through

        result = books.verify(books.pool.model_dir)

        assert result.returncode == 1, result.stdout + result.stderr
        [line] = problem_lines(result)
        assert inflated.receipt_id in line and str(INFLATED_FLOPS) in line, line
        with ledger.engine.begin() as connection:
            connection.execute(text("DELETE FROM postings WHERE receipt_id = :r"), {"r": inflated.receipt_id})
            connection.execute(text("DELETE FROM receipts WHERE receipt_id = :r"), {"r": inflated.receipt_id})
        clean = books.verify(books.pool.model_dir)  # every honest receipt's FLOPs are the manifest's
        assert clean.returncode == 0, clean.stdout + clean.stderr
    finally:
        ledger.close()


def test_attack_8_a_revoked_providers_later_receipt_is_not_paid(books: Books) -> None:
    """The receipts reach the coordinator's collector as a node's batch would (a live pool drops a revoked
    node from its routes and its collection rounds once it hears of the revocation: this is the booking
    that must hold even when a receipt gets there anyway)."""
    delta = MemberBundle.load(add_member(books.pool_dir, "Delta"))
    coordinator = MemberBundle.load(books.bundles["Coord"])
    gamma_key = api_key_id(api_key_digest(books.keys["Gamma"]))
    ledger = books.ledger()
    try:

        def observed_receipt(ended_at: float) -> ReceiptBody:
            """A session of Delta's node that the coordinator saw, and Delta's receipt for it."""
            session_id = new_receipt_id()
            ledger.observe(
                [Observation(session_id=session_id, node_id="delta-1", provider="Delta", consumer="Gamma",
                             start_block=0, end_block=2, prefill_tokens=5, decode_tokens=3, api_key_id=gamma_key)]
            )  # fmt: skip
            return ReceiptBody(
                new_receipt_id(), delta.pool_id, session_id, "delta-1", "Delta", "Coord",
                books.manifest.content_hash, 0, 2, 5, 3, 8 * books.manifest.span_flops_per_token(0, 2),
                ended_at - 1, ended_at,
            )  # fmt: skip

        before = observed_receipt(time.time())
        revoked = coop("member", "revoke", "Delta", "--pool", str(books.pool_dir))
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        after = observed_receipt(time.time())
        revocations = Revocations(coordinator.ca_cert_pem, coordinator.pool_id)
        assert revocations.offer(read_revocations(PoolInfo.load(books.pool_dir)))  # as a coordinator's watcher does
        checker = ReceiptChecker(
            coordinator.pool_id,
            coordinator.ca_cert_pem,
            books.manifest.content_hash,
            books.manifest.span_flops_per_token,
            coordinator,
            ledger.observation,
            ledger.booked_for,
            revoked_since=revocations.revoked_since,
        )
        metering = Metering(FairShare(), books.manifest.span_flops_per_token)
        collector = ReceiptCollector(ledger, checker, metering, lambda: ChannelPool(ChannelSecurity()), list)
        batch = [
            receipt_to_proto(body.receipt_id, sign_receipt(delta.credentials("delta-1"), body))
            for body in (before, after)
        ]

        settled = collector.settle(batch, NodeKey("Delta", "delta-1"))

        assert (settled.booked, settled.rejected) == ([before.receipt_id], [after.receipt_id])
        delta_balance = ledger.balance("Delta")
        assert delta_balance is not None and delta_balance.balance_flops == before.flops
        [event] = [e for e in ledger.audit_events(action="receipt_rejected") if e.subject == after.receipt_id]
        assert "after 'Delta' was revoked" in event.detail
        assert books.verify().returncode == 0
    finally:
        ledger.close()


def test_attack_8_grants_of_a_billion_credits_and_sums_past_64_bits_are_exact(books: Books) -> None:
    ledger = books.ledger()
    try:
        before = ledger.balance("Gamma")
        assert before is not None
        pool_before = ledger.pool_balance_flops()
        for amount in ("1000000000", "1000000000", "1000000000.000000000001"):
            granted = coop("ledger", "grant", "Gamma", amount, "--pool", str(books.pool_dir), "--reason", "endowment")
            assert granted.returncode == 0, granted.stdout + granted.stderr
        floor = coop("ledger", "floor", "Gamma", "--credits", "-9999999999.5", "--pool", str(books.pool_dir))
        assert floor.returncode == 0, floor.stdout + floor.stderr
        books.chat_and_book(books.coordinator.ready["url"], books.keys["Gamma"], "Spend a little.")

        gamma = ledger.balance("Gamma")
        assert gamma is not None
        total = 3 * BILLION + 1  # 3 * 10^21 + 1 FLOPs: over 300 times 2^63, exact to the FLOP
        used = gamma.used_flops - before.used_flops
        assert used > 0 and gamma.granted_flops == before.granted_flops + total
        assert gamma.balance_flops == before.balance_flops + total - used
        assert ledger.credit_state("Gamma") == (gamma.balance_flops, gamma.credit_floor_flops)
        assert gamma.credit_floor_flops == -9_999_999_999 * FLOPS_PER_CREDIT - FLOPS_PER_CREDIT // 2
        assert ledger.pool_balance_flops() == pool_before - total
        assert sum(b.balance_flops for b in ledger.balances()) + ledger.pool_balance_flops() == 0
        shown = coop("ledger", "balances", "--pool", str(books.pool_dir)).stdout
        assert f"{Decimal(gamma.balance_flops) / FLOPS_PER_CREDIT:,.6f}" in shown
        assert f"{Decimal(ledger.pool_balance_flops()) / FLOPS_PER_CREDIT:,.6f}" in shown
        result = books.verify()
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        ledger.close()
