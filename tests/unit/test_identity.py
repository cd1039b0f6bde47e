"""Pool identity: CA, member bundles, mutual TLS over real gRPC, signed announcements, revocations, API keys.

Everything runs for real: keys are generated, TLS handshakes happen on 127.0.0.1, and one test
round-trips signed announcements through a hivemind DHT peer (msgpack must not break signatures).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import stat
import time
import tomllib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from coop.cli import app
from coop.errors import InvalidInput, Unauthorized
from coop.pool.api_keys import ApiKeyStore
from coop.pool.bundle import MemberBundle
from coop.pool.ca import member_certificate, peer_institution, verify_member_certificate, verify_signature
from coop.pool.registry import (
    PoolInfo,
    add_member,
    create_api_key,
    create_pool,
    list_members,
    load_ca,
    revoke_api_keys,
    revoke_member,
)
from coop.pool.revocation import RevocationList
from coop.swarm.announcement import AnnouncementVerifier, NodeAnnouncement, announcement_payload, sign_announcement
from coop.swarm.directory import SwarmDirectory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass
class Pool:
    info: PoolInfo
    a: MemberBundle
    b: MemberBundle


def make_pool(root: Path, name: str = "Test Pool") -> Pool:
    info = create_pool(root, name)
    a = MemberBundle.load(add_member(root, "University A"))
    b = MemberBundle.load(add_member(root, "Lab B [gpu]"))
    return Pool(info, a, b)


@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    return make_pool(tmp_path / "pool")


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pool, Pool]:
    """Two independent pools, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("pools")
    return make_pool(root / "one"), make_pool(root / "two", "Other Pool")


# ------------------------------------------------------------------------------------------ pool init


def test_create_pool_writes_secrets_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        info = create_pool(tmp_path / "p", "Pool", bootstrap=["/ip4/10.0.0.1/tcp/31337/p2p/Qm"])
    finally:
        os.umask(old)
    d = info.directory
    for secret in ("ca.key", "admin.token", "api_keys.json"):
        assert mode(d / secret) == 0o600, secret
    assert mode(d / "members") == 0o700
    assert re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", info.pool_id)

    assert info.admin_token is not None
    assert (d / "admin.token").read_text().strip() == info.admin_token
    doc = tomllib.loads((d / "pool.toml").read_text())
    assert doc["pool_id"] == info.pool_id and doc["name"] == "Pool"
    assert doc["bootstrap"] == ["/ip4/10.0.0.1/tcp/31337/p2p/Qm"] and "ledger_url" not in doc  # members read it
    assert doc["admin_token_sha256"] == hashlib.sha256(info.admin_token.encode()).hexdigest()
    assert doc["limits"]["max_tokens_per_request"] > 0 and doc["limits"]["max_concurrent_requests_per_key"] > 0
    assert info.admin_token not in (d / "pool.toml").read_text()

    loaded = PoolInfo.load(d)
    assert loaded == info and loaded.admin_token is None
    assert loaded.check_admin_token(info.admin_token) and not loaded.check_admin_token("coop_admin_guess")

    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_create_pool_refuses_an_existing_pool_and_changes_nothing(tmp_path: Path) -> None:
    create_pool(tmp_path, "Pool")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(InvalidInput, match="already holds a pool"):
        create_pool(tmp_path, "Pool again")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("name", ["", "x" * 65, "bad\nname", "tab\there", " padded", "../escape", "a/b", ".hidden"])
def test_names_are_validated(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidInput):
        create_pool(tmp_path / "p", name)
    create_pool(tmp_path / "ok", "ok")
    with pytest.raises(InvalidInput):
        add_member(tmp_path / "ok", name)
    assert not any((tmp_path / "ok" / "members").iterdir())


# --------------------------------------------------------------------------------------------- members


def test_add_member_writes_a_0600_bundle_that_loads(pool: Pool) -> None:
    d = pool.info.directory
    bundle_path = d / "members" / "University A.bundle"
    assert mode(bundle_path) == 0o600
    assert pool.a.institution == "University A" and pool.a.pool_id == pool.info.pool_id
    assert pool.a.pool_name == "Test Pool" and pool.a.ca_cert_pem == (d / "ca.crt").read_bytes()
    assert b"PRIVATE KEY" not in repr(pool.a).encode()

    assert verify_member_certificate(pool.a.ca_cert_pem, pool.a.cert_pem, pool_id=pool.info.pool_id) == "University A"
    cert = x509.load_pem_x509_certificate(pool.a.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert f"coop://{pool.info.pool_id}/member/University%20A" in san.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= dt.timedelta(days=365)

    members = list_members(d)
    assert [m.institution for m in members] == ["Lab B [gpu]", "University A"]
    assert members[1].serial == format(cert.serial_number, "x") and not members[1].revoked

    with pytest.raises(InvalidInput, match="already exists"):
        add_member(d, "University A")


def test_bundle_load_reports_missing_corrupt_and_mismatched_files(pool: Pool, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        MemberBundle.load(tmp_path / "nope.bundle")
    corrupt = tmp_path / "corrupt.bundle"
    corrupt.write_text("{not json")
    with pytest.raises(InvalidInput, match="not a valid coop member bundle"):
        MemberBundle.load(corrupt)
    doc = json.loads(pool.a.to_bytes())
    doc["key_pem"] = pool.b.key_pem.decode()
    swapped = tmp_path / "swapped.bundle"
    swapped.write_text(json.dumps(doc))
    with pytest.raises(InvalidInput, match="does not match"):
        MemberBundle.load(swapped)


def test_certificates_are_checked_for_ca_pool_expiry_and_revocation(pools: tuple[Pool, Pool]) -> None:
    one, two = pools
    pid = one.info.pool_id
    with pytest.raises(Unauthorized, match="not issued by this pool's CA"):
        verify_member_certificate(one.a.ca_cert_pem, two.a.cert_pem, pool_id=pid)
    with pytest.raises(Unauthorized, match="belongs to pool"):
        verify_member_certificate(one.a.ca_cert_pem, one.a.cert_pem, pool_id=two.info.pool_id)
    with pytest.raises(Unauthorized, match="expired"):
        verify_member_certificate(
            one.a.ca_cert_pem, one.a.cert_pem, pool_id=pid, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
        )
    with pytest.raises(Unauthorized, match="revoked"):
        verify_member_certificate(one.a.ca_cert_pem, one.a.cert_pem, pool_id=pid, revoked={"University A"})
    with pytest.raises(Unauthorized, match="CA"):
        verify_member_certificate(one.a.ca_cert_pem, one.a.ca_cert_pem, pool_id=pid)
    with pytest.raises(Unauthorized):
        verify_member_certificate(one.a.ca_cert_pem, b"garbage", pool_id=pid)


def test_signatures(pools: tuple[Pool, Pool]) -> None:
    one, _ = pools
    signature = one.a.sign(b"payload")
    verify_signature(one.a.cert_pem, b"payload", signature)
    with pytest.raises(Unauthorized):
        verify_signature(one.a.cert_pem, b"payload!", signature)
    with pytest.raises(Unauthorized):
        verify_signature(one.b.cert_pem, b"payload", signature)
    with pytest.raises(Unauthorized):
        verify_signature(one.a.cert_pem, b"payload", b"\x00" * 8)


# -------------------------------------------------------------------------------------------- mutual TLS


@dataclass
class EchoServer:
    port: int
    seen: list[tuple[str | None, dict[str, list[bytes]]]]


@pytest.fixture(scope="module")
def echo_server(pools: tuple[Pool, Pool]) -> Iterator[EchoServer]:
    """A real gRPC server with member A's mutual-TLS credentials and one raw-bytes echo method."""
    one, _ = pools
    seen: list[tuple[str | None, dict[str, list[bytes]]]] = []

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        auth = {key: list(values) for key, values in context.auth_context().items()}
        seen.append((peer_institution(auth, pool_id=one.info.pool_id), auth))
        return request

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", one.a.server_credentials())
    server.start()
    try:
        yield EchoServer(port, seen)
    finally:
        server.stop(grace=None)


def call_echo(port: int, credentials: grpc.ChannelCredentials, options: list[tuple[str, str]] | None = None) -> bytes:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options or []) as channel:
        result: bytes = channel.unary_unary("/test.Echo/Echo")(b"ping", timeout=5)
        return result


def test_members_of_one_pool_talk_over_mutual_tls(pools: tuple[Pool, Pool], echo_server: EchoServer) -> None:
    one, _ = pools
    assert call_echo(echo_server.port, one.b.channel_credentials()) == b"ping"
    institution, auth = echo_server.seen[-1]
    assert institution == "Lab B [gpu]"
    assert auth["transport_security_type"] == [b"ssl"]
    assert auth["x509_common_name"] == [b"Lab B [gpu]"]
    assert auth["x509_pem_cert"][0].startswith(b"-----BEGIN CERTIFICATE-----")
    # Nodes on other hosts are reached through the pool-wide TLS name every member certificate carries.
    assert call_echo(echo_server.port, one.b.channel_credentials(), one.b.channel_options()) == b"ping"
    assert peer_institution({}) is None


def test_tls_refuses_clients_from_another_pool_or_without_a_certificate(
    pools: tuple[Pool, Pool], echo_server: EchoServer
) -> None:
    one, two = pools
    count = len(echo_server.seen)
    # a client of another pool that (wrongly) trusts this pool's CA still presents a foreign certificate
    foreign = grpc.ssl_channel_credentials(
        root_certificates=one.a.ca_cert_pem, private_key=two.a.key_pem, certificate_chain=two.a.cert_pem
    )
    no_cert = grpc.ssl_channel_credentials(root_certificates=one.a.ca_cert_pem)
    for credentials in (foreign, no_cert, two.a.channel_credentials()):
        with pytest.raises(grpc.RpcError) as info:
            call_echo(echo_server.port, credentials)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(echo_server.seen) == count


# ---------------------------------------------------------------------------------------- announcements


def make_ann(pool: Pool, institution: str = "University A", **overrides: object) -> NodeAnnouncement:
    now = time.time()
    fields: dict[str, object] = dict(
        node_id="node-a",
        pool_id=pool.info.pool_id,
        model_hash="abc123",
        start=0,
        end=4,
        endpoint="127.0.0.1:50051",
        institution=institution,
        throughput_tps=12.5,
        free_cache_bytes=1 << 30,
        announced_at=now,
        expires_at=now + 30,
    )
    fields.update(overrides)
    return NodeAnnouncement.model_validate(fields)


def changed(ann: NodeAnnouncement, **changes: object) -> NodeAnnouncement:
    return NodeAnnouncement.model_validate({**ann.to_wire(), **changes})


def test_signed_announcements_verify_and_tampering_is_rejected(pools: tuple[Pool, Pool]) -> None:
    one, two = pools
    revoked: set[str] = set()
    verify = AnnouncementVerifier(one.info.ca_cert_pem(), one.info.pool_id, revoked=lambda: revoked)
    signed = sign_announcement(one.a, make_ann(one))
    assert signed.certificate == one.a.cert_pem and signed.signature
    assert verify(signed) and verify.check(signed) == "University A"
    assert verify(NodeAnnouncement.from_wire(signed.to_wire()))

    ca_key, ca_cert = load_ca(one.info)
    other_pool_key, other_pool_cert = member_certificate(ca_key, ca_cert, "other-pool", "University A")
    other_pool_pem = other_pool_cert.public_bytes(serialization.Encoding.PEM)

    def forged(cert_pem: bytes, signer: MemberBundle | None = None) -> NodeAnnouncement:
        """signed, re-signed with another certificate and its own key: a valid signature, wrong authority."""
        ann = changed(signed, certificate=cert_pem, signature=b"")
        payload = announcement_payload(ann)
        signature = signer.sign(payload) if signer else other_pool_key.sign(payload, ec.ECDSA(hashes.SHA256()))
        return changed(ann, signature=signature)

    rejected = {
        "unsigned": make_ann(one),
        "changed span": changed(signed, start=1),
        "changed end": changed(signed, end=3),
        "changed endpoint": changed(signed, endpoint="10.6.6.6:50051"),
        "changed expiry": changed(signed, expires_at=signed.expires_at + 3600),
        "bad signature": changed(signed, signature=signed.signature[:-2] + b"\x00\x00"),
        "signature of another member": changed(signed, signature=one.b.sign(b"something")),
        "institution mismatch": forged(one.b.cert_pem, one.b),
        "cert from another CA": forged(two.a.cert_pem, two.a),
        "cert for another pool id": forged(other_pool_pem),
        "announcement for another pool": sign_announcement(two.a, make_ann(two)),
    }
    reasons = {
        "unsigned": "not signed",
        "changed span": "signature does not match",
        "changed end": "signature does not match",
        "changed endpoint": "signature does not match",
        "changed expiry": "signature does not match",
        "bad signature": "signature does not match",
        "signature of another member": "signature does not match",
        "institution mismatch": "cannot announce for",
        "cert from another CA": "not issued by this pool's CA",
        "cert for another pool id": "belongs to pool 'other-pool'",
        "announcement for another pool": "announcement is for pool",
    }
    for what, ann in rejected.items():
        assert not verify(ann), what
        with pytest.raises(Unauthorized, match=reasons[what]):
            verify.check(ann)
    revoked.add("University A")
    assert not verify(signed), "revoked"
    with pytest.raises(Unauthorized, match="revoked"):
        verify.check(signed)

    with pytest.raises(InvalidInput, match="cannot sign"):
        sign_announcement(one.b, make_ann(one))


def test_list_nodes_keeps_only_signed_announcements_after_a_dht_round_trip(pools: tuple[Pool, Pool]) -> None:
    one, _ = pools
    verify = AnnouncementVerifier(one.info.ca_cert_pem(), one.info.pool_id)
    good = sign_announcement(one.a, make_ann(one, node_id="good"))
    tampered = changed(sign_announcement(one.b, make_ann(one, "Lab B [gpu]", node_id="tampered")), start=1)
    unsigned = make_ann(one, node_id="unsigned")
    with SwarmDirectory.start([]) as directory:
        for ann in (good, tampered, unsigned):
            assert directory.announce(ann)
        nodes = directory.list_nodes(one.info.pool_id, "abc123", validator=verify)
        assert [n.node_id for n in nodes] == ["good"]
        assert len(directory.list_nodes(one.info.pool_id, "abc123")) == 3


# ------------------------------------------------------------------------------------------ revocations


def test_revocation_list_is_signed_and_tampering_is_detected(pool: Pool, tmp_path: Path) -> None:
    d = pool.info.directory
    key = create_api_key(d, "University A")
    revocations = revoke_member(d, "University A")
    assert revocations.revoked == ("University A",) and len(revocations.serials) == 1
    ca_pem = pool.info.ca_cert_pem()
    loaded = RevocationList.load(d / "revocations.json", ca_pem)
    assert loaded == revocations
    assert revoke_member(d, "University A").revoked == ("University A",)  # idempotent

    tampered = RevocationList(loaded.pool_id, (), (), loaded.issued_at, loaded.signature)
    with pytest.raises(Unauthorized, match="not signed"):
        tampered.verify(ca_pem)
    other = make_pool(tmp_path / "other")
    with pytest.raises(Unauthorized):
        loaded.verify(other.info.ca_cert_pem())
    with pytest.raises(InvalidInput, match="malformed"):
        RevocationList.from_bytes(b'{"pool_id": "x"}')
    with pytest.raises(InvalidInput, match="no member"):
        revoke_member(d, "Nobody")

    assert [m.revoked for m in list_members(d)] == [False, True]
    assert ApiKeyStore.load(d / "api_keys.json").resolve(key) is None, "revoking a member revokes its keys"
    with pytest.raises(Unauthorized, match="revoked"):
        create_api_key(d, "University A")


# --------------------------------------------------------------------------------------------- API keys


def test_api_keys_are_shown_once_and_stored_as_hashes(pool: Pool) -> None:
    d = pool.info.directory
    key_a = create_api_key(d, "University A")
    key_b = create_api_key(d, "Lab B [gpu]")
    assert key_a.startswith("coop_") and key_a != key_b
    raw = (d / "api_keys.json").read_text()
    assert key_a not in raw and key_b not in raw
    assert hashlib.sha256(key_a.encode()).hexdigest() in raw
    assert mode(d / "api_keys.json") == 0o600

    store = ApiKeyStore.load(d / "api_keys.json")
    assert store.resolve(key_a) == "University A" and store.resolve(key_b) == "Lab B [gpu]"
    assert store.resolve("coop_wrong") is None and store.resolve("") is None

    assert revoke_api_keys(d, "University A") == 1
    store = ApiKeyStore.load(d / "api_keys.json")
    assert store.resolve(key_a) is None and store.resolve(key_b) == "Lab B [gpu]"
    with pytest.raises(InvalidInput, match="no member"):
        create_api_key(d, "Nobody")


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_pool_and_member_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    d = tmp_path / "pool"

    result = runner.invoke(app, ["pool", "init", str(d), "--name", "CLI Pool"])
    assert result.exit_code == 0, result.output
    token = (d / "admin.token").read_text().strip()
    assert token in result.stdout

    again = runner.invoke(app, ["pool", "init", str(d), "--name", "CLI Pool"])
    assert again.exit_code == 1 and "already holds a pool" in again.stderr and token not in again.output

    added = runner.invoke(app, ["member", "add", "Uni [x]", "--pool", str(d)])
    assert added.exit_code == 0, added.output
    assert "Uni [x]" in added.stdout and "PRIVATE KEY" not in added.output
    MemberBundle.load(d / "members" / "Uni [x].bundle")

    created = runner.invoke(app, ["member", "key", "create", "Uni [x]", "--pool", str(d)])
    assert created.exit_code == 0, created.output
    key = re.search(r"coop_\S+", created.stdout)
    assert key and ApiKeyStore.load(d / "api_keys.json").resolve(key.group()) == "Uni [x]"

    listed = runner.invoke(app, ["member", "list", "--pool", str(d)])
    assert listed.exit_code == 0 and "Uni [x]" in listed.stdout and "active" in listed.stdout
    assert token not in listed.output and key.group() not in listed.output

    revoked = runner.invoke(app, ["member", "revoke", "Uni [x]", "--pool", str(d)])
    assert revoked.exit_code == 0, revoked.output
    assert "revoked" in runner.invoke(app, ["member", "list", "--pool", str(d)]).stdout

    missing = runner.invoke(app, ["member", "list", "--pool", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "does not exist" in missing.stderr


def test_the_pool_account_name_is_reserved(tmp_path: Path) -> None:
    create_pool(tmp_path, "Pool")
    with pytest.raises(InvalidInput, match="reserved"):
        add_member(tmp_path, "Pool")
