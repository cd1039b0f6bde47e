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
from coop.pool.bundle import Credentials, MemberBundle
from coop.pool.ca import (
    coordinator_certificate,
    key_pem,
    member_certificate,
    member_domain,
    node_certificate,
    verify_signature,
)
from coop.pool.identity import Identity, peer_identity, verify_identity
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
from tests.pools import make_pool


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass
class Pool:
    info: PoolInfo
    a: MemberBundle
    b: MemberBundle


def two_member_pool(root: Path, name: str = "Test Pool") -> Pool:
    disk = make_pool(root, name, ("University A", "Lab B [gpu]"))
    return Pool(disk.info, *(MemberBundle.load(bundle) for bundle in disk.bundles.values()))


@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    return two_member_pool(tmp_path / "pool")


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pool, Pool]:
    """Two independent pools, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("pools")
    return two_member_pool(root / "one"), two_member_pool(root / "two", "Other Pool")


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

    identity = verify_identity(pool.a.ca_cert_pem, pool.a.cert_pem, pool_id=pool.info.pool_id)
    assert (identity.role, identity.institution, identity.node_id) == ("member", "University A", None)
    cert = x509.load_pem_x509_certificate(pool.a.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"coop://{pool.info.pool_id}/member/University%20A"
    ]
    constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical and constraints.value.permitted_subtrees == [
        x509.DNSName(member_domain(pool.info.pool_id, "University A"))
    ]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= dt.timedelta(days=365)

    members = list_members(d)
    assert [m.institution for m in members] == ["Lab B [gpu]", "University A"]
    assert members[1].serial == format(cert.serial_number, "x") and not members[1].revoked

    with pytest.raises(InvalidInput, match="already exists"):
        add_member(d, "University A")


def test_a_coordinator_bundle_is_a_leaf_of_the_pool_ca_and_a_member_bundle_cannot_coordinate(pool: Pool) -> None:
    d = pool.info.directory
    coordinator = MemberBundle.load(add_member(d, "University A", role="coordinator"))
    assert (d / "coordinators" / "University A.bundle").exists()
    assert coordinator.identity.role == "coordinator" and coordinator.credentials().chain_pem == coordinator.cert_pem
    with pytest.raises(InvalidInput, match="coordinator bundle"):
        pool.a.credentials()
    node = pool.a.credentials("node-1")
    assert (node.identity.role, node.identity.node_id, node.institution) == ("node", "node-1", "University A")


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
    ca = one.a.ca_cert_pem
    with pytest.raises(Unauthorized, match="belongs to pool"):
        verify_identity(ca, two.a.cert_pem, pool_id=pid)
    with pytest.raises(Unauthorized, match="belongs to pool"):
        verify_identity(ca, one.a.cert_pem, pool_id=two.info.pool_id)
    with pytest.raises(Unauthorized, match="expired"):
        verify_identity(ca, one.a.cert_pem, pool_id=pid, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=400))
    with pytest.raises(Unauthorized, match="revoked"):
        verify_identity(ca, one.a.cert_pem, pool_id=pid, revoked={"University A"})
    with pytest.raises(Unauthorized, match="not a coop certificate"):
        verify_identity(ca, ca, pool_id=pid)
    with pytest.raises(Unauthorized):
        verify_identity(ca, b"garbage", pool_id=pid)


def test_node_chains_bind_node_institution_and_member(pools: tuple[Pool, Pool]) -> None:
    one, two = pools
    pid, ca = one.info.pool_id, one.a.ca_cert_pem
    node = one.a.credentials("node-a")
    assert verify_identity(ca, node.chain_pem, pool_id=pid) == Identity(pid, "node", "University A", "node-a")
    with pytest.raises(Unauthorized, match="revoked"):
        verify_identity(ca, node.chain_pem, pool_id=pid, revoked={"University A"})
    leaf = node.chain_pem[: node.chain_pem.index(b"-----END CERTIFICATE-----") + 26]
    with pytest.raises(Unauthorized, match="must come with"):
        verify_identity(ca, leaf, pool_id=pid)
    with pytest.raises(Unauthorized, match="not issued by that member"):
        verify_identity(ca, leaf + one.b.cert_pem, pool_id=pid)  # A's node presented with B's member certificate
    with pytest.raises(Unauthorized, match="belongs to pool"):
        verify_identity(ca, two.a.credentials("node-a").chain_pem, pool_id=pid)

    # A member signs a certificate that claims to be a node of another member, or a coordinator.
    member_key = serialization.load_pem_private_key(one.a.key_pem, password=None)
    assert isinstance(member_key, ec.EllipticCurvePrivateKey)
    member_cert = x509.load_pem_x509_certificate(one.a.cert_pem)
    _, posing = node_certificate(member_key, member_cert, pid, "Lab B [gpu]", "node-b")
    with pytest.raises(Unauthorized, match="not issued by"):
        verify_identity(ca, posing.public_bytes(serialization.Encoding.PEM) + one.b.cert_pem, pool_id=pid)
    with pytest.raises(Unauthorized, match="not issued by that member"):
        verify_identity(ca, posing.public_bytes(serialization.Encoding.PEM) + one.a.cert_pem, pool_id=pid)
    _, coordinator = coordinator_certificate(member_key, member_cert, pid, "University A")
    with pytest.raises(Unauthorized, match="not issued by"):
        verify_identity(ca, coordinator.public_bytes(serialization.Encoding.PEM), pool_id=pid)


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
    node = one.a.credentials("node-a")
    verify_signature(node.chain_pem, b"payload", node.sign(b"payload"))  # the leaf's key signs


# -------------------------------------------------------------------------------------------- mutual TLS


@dataclass
class EchoServer:
    port: int
    seen: list[tuple[Identity | None, dict[str, list[bytes]]]]


@pytest.fixture(scope="module")
def echo_server(pools: tuple[Pool, Pool]) -> Iterator[EchoServer]:
    """A real gRPC server with node-a of member A's mutual-TLS credentials and one raw-bytes echo method."""
    one, _ = pools
    seen: list[tuple[Identity | None, dict[str, list[bytes]]]] = []

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        auth = {key: list(values) for key, values in context.auth_context().items()}
        seen.append((peer_identity(auth, one.a.ca_cert_pem, pool_id=one.info.pool_id), auth))
        return request

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", one.a.credentials("node-a").server_credentials())
    server.start()
    try:
        yield EchoServer(port, seen)
    finally:
        server.stop(grace=None)


def call_echo(port: int, credentials: grpc.ChannelCredentials, name: str) -> bytes:
    options = [("grpc.ssl_target_name_override", name)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        result: bytes = channel.unary_unary("/test.Echo/Echo")(b"ping", timeout=5)
        return result


def test_nodes_of_one_pool_talk_over_mutual_tls_as_exactly_who_they_are(
    pools: tuple[Pool, Pool], echo_server: EchoServer
) -> None:
    one, _ = pools
    client = one.b.credentials("node-b")
    node_a = client.node_tls_name("University A", "node-a")
    assert call_echo(echo_server.port, client.channel_credentials(), node_a) == b"ping"
    identity, auth = echo_server.seen[-1]
    assert identity == Identity(one.info.pool_id, "node", "Lab B [gpu]", "node-b")
    assert auth["transport_security_type"] == [b"ssl"]
    assert auth["x509_pem_cert"][0].startswith(b"-----BEGIN CERTIFICATE-----")
    assert peer_identity({}, one.a.ca_cert_pem, pool_id=one.info.pool_id) is None

    # The server must be the node the client expects: another node id or institution fails TLS.
    for wrong in (client.node_tls_name("University A", "node-z"), client.node_tls_name("Lab B [gpu]", "node-a")):
        with pytest.raises(grpc.RpcError) as info:
            call_echo(echo_server.port, client.channel_credentials(), wrong)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_member_cannot_mint_a_certificate_for_another_members_node(pools: tuple[Pool, Pool]) -> None:
    """The name constraint on B's member certificate, enforced by TLS itself: a server B made for
    A's node name is refused, and so is a client presenting such a certificate."""
    one, _ = pools
    pid = one.info.pool_id
    b_key = serialization.load_pem_private_key(one.b.key_pem, password=None)
    assert isinstance(b_key, ec.EllipticCurvePrivateKey)
    key, cert = node_certificate(b_key, x509.load_pem_x509_certificate(one.b.cert_pem), pid, "University A", "node-a")
    chain = cert.public_bytes(serialization.Encoding.PEM) + one.b.cert_pem
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda r, c: r)}
    )
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(key_pem(key), chain)], root_certificates=one.a.ca_cert_pem, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        coordinator = one.a.credentials("node-c")
        with pytest.raises(grpc.RpcError) as info:
            call_echo(port, coordinator.channel_credentials(), coordinator.node_tls_name("University A", "node-a"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=None)


def test_tls_refuses_clients_from_another_pool_or_without_a_certificate(
    pools: tuple[Pool, Pool], echo_server: EchoServer
) -> None:
    one, two = pools
    count = len(echo_server.seen)
    name = one.a.credentials("x").node_tls_name("University A", "node-a")
    foreign_node = two.a.credentials("node-f")
    # a client of another pool that (wrongly) trusts this pool's CA still presents a foreign certificate
    foreign = grpc.ssl_channel_credentials(
        root_certificates=one.a.ca_cert_pem, private_key=foreign_node.key_pem, certificate_chain=foreign_node.chain_pem
    )
    no_cert = grpc.ssl_channel_credentials(root_certificates=one.a.ca_cert_pem)
    for credentials in (foreign, no_cert, foreign_node.channel_credentials()):
        with pytest.raises(grpc.RpcError) as info:
            call_echo(echo_server.port, credentials, name)
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
    node_a = one.a.credentials("node-a")
    signed = sign_announcement(node_a, make_ann(one))
    assert signed.certificate == node_a.chain_pem and signed.signature
    assert verify(signed) and verify.check(signed) == "University A"
    assert verify(NodeAnnouncement.from_wire(signed.to_wire()))

    ca_key, ca_cert = load_ca(one.info)
    other_pool_key, other_pool_cert = member_certificate(ca_key, ca_cert, "other-pool", "University A")
    other_pool_pem = other_pool_cert.public_bytes(serialization.Encoding.PEM)
    node_b, other_node, foreign = one.b.credentials("node-a"), one.a.credentials("node-z"), two.a.credentials("node-a")

    def forged(cert_pem: bytes, signer: Credentials | None = None) -> NodeAnnouncement:
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
        "institution mismatch": forged(node_b.chain_pem, node_b),
        "another node of the member": forged(other_node.chain_pem, other_node),
        "the member itself": forged(one.a.cert_pem),
        "cert from another CA": forged(foreign.chain_pem, foreign),
        "cert for another pool id": forged(other_pool_pem),
        "announcement for another pool": sign_announcement(foreign, make_ann(two)),
    }
    reasons = {
        "unsigned": "not signed",
        "changed span": "signature does not match",
        "changed end": "signature does not match",
        "changed endpoint": "signature does not match",
        "changed expiry": "signature does not match",
        "bad signature": "signature does not match",
        "signature of another member": "signature does not match",
        "institution mismatch": "cannot sign for node",
        "another node of the member": "cannot sign for node",
        "the member itself": "is not a node",
        "cert from another CA": "belongs to pool",
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
        sign_announcement(node_b, make_ann(one))


def test_list_nodes_keeps_only_signed_announcements_after_a_dht_round_trip(pools: tuple[Pool, Pool]) -> None:
    one, _ = pools
    verify = AnnouncementVerifier(one.info.ca_cert_pem(), one.info.pool_id)
    good = sign_announcement(one.a.credentials("good"), make_ann(one, node_id="good"))
    tampered_node = one.b.credentials("tampered")
    tampered = changed(sign_announcement(tampered_node, make_ann(one, "Lab B [gpu]", node_id="tampered")), start=1)
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
    other = two_member_pool(tmp_path / "other")
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
