"""`coop node doctor`: why a node would not serve, in one checklist with a fix for every failure.

The checks look at what `coop node start` would use, with the same settings: the member bundle
(certificate chain, expiry, revocation), the model files against the manifest's hashes, memory for
the blocks, the port, the DHT, and then — from another pool node, through the DialBack RPC — whether
the endpoint the node would announce is reachable from the pool and how far apart the two clocks
are. For the dial-back the doctor listens on the node's port with a node certificate of its own,
exactly as the node will, so a firewall or a wrong announce host shows up here and not in routes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import torch

from coop.config import NodeSettings
from coop.errors import CoopError
from coop.model.files import verify_all
from coop.model.manifest import Manifest
from coop.pool.ca import ROLE_MEMBER, load_cert, utc_now
from coop.pool.membership import Membership
from coop.swarm.announcement import NodeAnnouncement, announcement_validator
from coop.swarm.directory import SwarmDirectory
from coop.swarm.revocations import refresh_revocations
from coop.swarm.validation import CLOCK_SKEW_S, pool_record_validator
from coop.wire.channels import GRPC_OPTIONS, ChannelSecurity
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc

Status = Literal["OK", "WARN", "FAIL"]
EXPIRY_WARNING = dt.timedelta(days=30)
CLOCK_WARN_S = 5.0  # beyond this, logs and receipts of the pool disagree visibly
DIAL_BACK_TIMEOUT_S = 20.0
MAX_PEERS_ASKED = 3


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""  # what to do about it; set for every WARN and FAIL


@dataclass
class _Context:
    """What earlier checks found that later ones need."""

    membership: Membership | None = None
    manifest: Manifest | None = None
    port_free: bool = False
    directory: SwarmDirectory | None = None


async def run_doctor(settings: NodeSettings, node_id: str = "") -> list[Check]:
    """Every check, in order; later checks that need an earlier one's result are skipped with a WARN."""
    node_id = node_id or settings.node_id or f"doctor-{uuid.uuid4().hex[:8]}"
    found = _Context()
    checks = [check_bundle(settings, node_id, found)]
    checks.append(await asyncio.to_thread(check_model, settings.model_dir, found))
    checks.append(check_memory(settings, found.manifest))
    checks.append(check_port(settings, found))
    checks.append(await asyncio.to_thread(check_dht, settings, found))
    try:
        checks.append(check_revocation(found))
        checks.extend(await check_dial_back(settings, node_id, found))
    finally:
        if found.directory is not None:
            await asyncio.to_thread(found.directory.shutdown)
    return checks


def check_bundle(settings: NodeSettings, node_id: str, found: _Context) -> Check:
    name = "bundle"
    path = settings.member_bundle
    ask = "ask the pool operator for a new member bundle (docs/operate.md, 'Add a member')"
    if path is None:
        return Check(name, "FAIL", "no --member bundle: a node outside a pool serves no one", ask)
    try:
        membership = Membership.load(path, node_id=node_id)
    except CoopError as exc:
        return Check(name, "FAIL", str(exc), ask)
    assert membership.bundle is not None
    bundle = membership.bundle
    if bundle.identity.role != ROLE_MEMBER:
        return Check(name, "FAIL", f"{path} is a {bundle.identity.role}'s bundle, not a member's", ask)
    found.membership = membership
    expires = load_cert(bundle.cert_pem, "member certificate").not_valid_after_utc
    detail = f"member {bundle.institution!r} of pool {bundle.pool_name!r}; certificate chains to the pool CA"
    if expires - utc_now() < EXPIRY_WARNING:
        return Check(name, "WARN", f"{detail}, but expires on {expires:%Y-%m-%d}", ask + " before then")
    return Check(name, "OK", f"{detail}, valid until {expires:%Y-%m-%d}")


def check_model(model_dir: Path, found: _Context) -> Check:
    name = "model"
    try:
        manifest = Manifest.load(model_dir)
        verify_all(model_dir, manifest)
    except CoopError as exc:
        fix = (
            f"prepare it again (coop model prepare SOURCE --out {model_dir}) or copy the directory from a good "
            "replica; every file's sha256 must match manifest.json"
        )
        return Check(name, "FAIL", str(exc), fix)
    found.manifest = manifest
    return Check(
        name, "OK", f"{manifest.name}: {manifest.num_blocks} blocks, {len(manifest.files)} files match the manifest"
    )


def free_memory_bytes(device: str) -> tuple[str, int]:
    """(where, bytes free) for the device the node would load its blocks on."""
    if (device in ("auto", "cuda") and torch.cuda.is_available()) or device.startswith("cuda:"):
        free, _total = torch.cuda.mem_get_info(torch.device(device if device.startswith("cuda:") else "cuda"))
        return f"GPU {torch.cuda.get_device_name()}", free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return "RAM", int(line.split()[1]) * 1024
    except OSError:
        pass
    return "RAM", os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(settings: NodeSettings, manifest: Manifest | None) -> Check:
    name = "memory"
    if manifest is None:
        return Check(name, "WARN", "skipped: the model did not load", "fix the model first")
    where, free = free_memory_bytes(settings.device)
    per_block = manifest.largest_block_bytes
    fit = max(0, (free - (settings.cache_budget_mb << 20)) // per_block)
    wanted = manifest.num_blocks
    if settings.blocks != "auto":
        start, _, end = settings.blocks.partition(":")
        wanted = int(end) - int(start) if start.isdigit() and end.isdigit() else wanted
    detail = (
        f"{where}: {free >> 20} MiB free; {min(fit, manifest.num_blocks)} of {manifest.num_blocks} blocks "
        f"({per_block / 2**20:.1f} MiB each) fit beside a {settings.cache_budget_mb} MiB KV cache"
    )
    if fit == 0:
        return Check(name, "FAIL", detail, "free memory, or lower --cache-budget-mb, or run on a larger machine")
    if fit < wanted:
        return Check(name, "WARN", detail, f"serve at most {fit} blocks (--blocks auto --max-blocks {fit})")
    return Check(name, "OK", detail)


def check_port(settings: NodeSettings, found: _Context) -> Check:
    name = "port"
    address = f"{settings.host}:{settings.port}"
    try:
        with socket.create_server((settings.host, settings.port)):
            pass
    except OSError as exc:
        fix = (
            f"stop whatever listens there (`ss -ltnp 'sport = :{settings.port}'` names it) or choose another --port"
            if settings.port
            else f"--host {settings.host} must be an address of this machine"
        )
        return Check(name, "FAIL", f"cannot listen on {address}: {exc.strerror or exc}", fix)
    found.port_free = True
    if settings.port == 0:
        return Check(
            name, "WARN", "--port 0: a random port at every start", "set a fixed --port and open it in the firewall"
        )
    return Check(name, "OK", f"{address} can be bound")


def _peers(settings: NodeSettings, membership: Membership | None) -> list[str]:
    if settings.initial_peers:
        return list(settings.initial_peers)
    return list(membership.bundle.bootstrap) if membership is not None and membership.bundle is not None else []


def check_dht(settings: NodeSettings, found: _Context) -> Check:
    name = "dht"
    peers = _peers(settings, found.membership)
    if not peers:
        fix = "pass --initial-peers (any pool member's DHT multiaddr; ask the operator)"
        return Check(name, "WARN", "skipped: no --initial-peers, and the bundle names no bootstrap peers", fix)
    if found.membership is None:
        return Check(name, "WARN", "skipped: the bundle did not load", "fix the bundle first")
    try:
        found.directory = SwarmDirectory.start(
            peers, settings.host, settings.dht_port, validator=pool_record_validator(found.membership)
        )
    except CoopError as exc:
        fix = (
            "check the multiaddrs (`coop dht start` prints them), that the peer runs, and that its TCP port "
            "is open to this machine"
        )
        return Check(name, "FAIL", str(exc), fix)
    return Check(name, "OK", f"joined the pool's DHT via {len(peers)} initial peer(s)")


def check_revocation(found: _Context) -> Check:
    name = "revocation"
    membership = found.membership
    if membership is None:
        return Check(name, "WARN", "skipped: the bundle did not load", "fix the bundle first")
    where = "the bundle's and saved lists"
    if found.directory is not None:
        refresh_revocations(membership.revocations, found.directory)
        where += " and the DHT's"
    if membership.institution in membership.revocations.names:
        fix = "a revoked member cannot serve or be paid; talk to the pool operator"
        return Check(name, "FAIL", f"{membership.institution!r} is revoked from this pool ({where})", fix)
    return Check(name, "OK", f"{membership.institution!r} is not revoked ({where})")


class _Listener(coop_pb2_grpc.NodeServicer):
    """Stands in for the node on its port while a peer dials back: answers Info as the node."""

    def __init__(self, membership: Membership, node_id: str) -> None:
        self._membership = membership
        self._node_id = node_id

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.NodeInfo:
        try:
            self._membership.authorize(context)
        except CoopError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return pb.NodeInfo(node_id=self._node_id)


async def check_dial_back(settings: NodeSettings, node_id: str, found: _Context) -> list[Check]:
    """The endpoint as another pool node sees it, and the clock against that node's."""
    skipped = [
        (found.membership is not None, "the bundle did not load", "fix the bundle first"),
        (found.manifest is not None, "the model did not load", "fix the model first"),
        (found.port_free, "the port cannot be bound", "free the port first"),
        (found.directory is not None, "the DHT was not joined", "join the DHT first"),
    ]
    for ok, why, fix in skipped:
        if not ok:
            return [Check("dial-back", "WARN", f"skipped: {why}", fix), _no_clock(why, fix)]
    membership, manifest, directory = found.membership, found.manifest, found.directory
    assert membership is not None and manifest is not None and directory is not None
    nodes = await asyncio.to_thread(
        directory.list_nodes, membership.pool_id, manifest.content_hash, announcement_validator(membership)
    )
    others = sorted((n for n in nodes if n.node_id != node_id), key=lambda n: n.institution == membership.institution)[
        :MAX_PEERS_ASKED
    ]
    if not others:
        why = f"no node of {manifest.name} is announced in the pool yet, so no peer can dial back"
        fix = "run the doctor again once another member's node serves this model"
        return [Check("dial-back", "WARN", why, fix), _no_clock("no peer to compare with", fix)]
    server = grpc.aio.server(options=GRPC_OPTIONS)
    coop_pb2_grpc.add_NodeServicer_to_server(_Listener(membership, node_id), server)
    port = membership.add_port(server, f"{settings.host}:{settings.port}")
    await server.start()
    endpoint = f"{settings.announce_host or settings.host}:{port}"
    try:
        return await _ask_peers(membership.channel_security(), others, endpoint, node_id)
    finally:
        await server.stop(0)


async def _ask_peers(
    security: ChannelSecurity, peers: list[NodeAnnouncement], endpoint: str, node_id: str
) -> list[Check]:
    problems = []
    for peer in peers:
        name = security.target_name(peer.institution, peer.node_id)
        assert security.credentials is not None
        async with grpc.aio.secure_channel(peer.endpoint, security.credentials, security.options(name)) as channel:
            sent = time.time()
            try:
                reply = await coop_pb2_grpc.NodeStub(channel).DialBack(
                    pb.DialBackRequest(endpoint=endpoint, node_id=node_id), timeout=DIAL_BACK_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    fix = "the pool does not accept this bundle (revoked or expired?): talk to the pool operator"
                    refused = Check("dial-back", "FAIL", f"node {peer.node_id} refused: {exc.details()}", fix)
                    return [refused, _no_clock("the peer refused to answer", fix)]
                problems.append(f"{peer.node_id}: {exc.code().name} {exc.details()}")
                continue
            received = time.time()
        return [_reachability(reply, peer, endpoint), _clock(reply.peer_time_unix_s - (sent + received) / 2, peer)]
    fix = "peers may be busy (a few dial-backs per member per minute); run the doctor again in a minute"
    silent = Check("dial-back", "WARN", "no peer answered: " + "; ".join(problems), fix)
    return [silent, _no_clock("no peer answered", fix)]


def _no_clock(why: str, fix: str) -> Check:
    return Check("clock", "WARN", f"skipped: {why}", fix)


def _reachability(reply: pb.DialBackReply, peer: NodeAnnouncement, endpoint: str) -> Check:
    by = f"node {peer.node_id} of {peer.institution!r}"
    if reply.reachable:
        return Check("dial-back", "OK", f"{by} reached this node at {endpoint}")
    host, _, port = endpoint.rpartition(":")
    fix = (
        f"make {endpoint} reachable from other members: open TCP port {port} in the firewall (and forward it "
        f"through NAT), or announce the address they can reach with COOP_NODE_ANNOUNCE_HOST (now {host})"
    )
    return Check("dial-back", "FAIL", f"{by} could not reach {endpoint}: {reply.error}", fix)


def _clock(skew_s: float, peer: NodeAnnouncement) -> Check:
    detail = f"{skew_s:+.1f} s against node {peer.node_id}"
    fix = "synchronise the clock with NTP (e.g. `timedatectl set-ntp true`, or chrony)"
    if abs(skew_s) > CLOCK_SKEW_S:
        return Check("clock", "FAIL", f"{detail}: the pool refuses DHT records this far off", fix)
    if abs(skew_s) > CLOCK_WARN_S:
        return Check("clock", "WARN", detail, fix)
    return Check("clock", "OK", detail)
