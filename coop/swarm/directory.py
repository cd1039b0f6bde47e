"""The swarm directory: which node serves which blocks of which model, kept in a hivemind DHT.

Every node of a pool announces itself under one DHT key per (pool_id, model_hash) — see
:func:`directory_key` — with (institution, node_id) as the subkey (a :class:`~coop.swarm.node_key.NodeKey`): node ids
are unique only within an institution, so another member's node of the same name has a subkey of
its own and can neither replace nor withdraw this one. One ``get`` therefore returns every node of a
model, and each node's record carries its own expiration: a node that stops refreshing drops out of
the directory when its TTL passes, without anyone having to notice that it died.

hivemind quirks this module works around (hivemind 1.1.12):

* A subkey store is accepted only if its expiration is *later* than the one already stored, and a store
  whose expiration is already past is rejected outright. So a record cannot be deleted by re-storing
  it "expiring now"; :meth:`SwarmDirectory.withdraw` stores a tombstone (a signed `Withdrawal`) that
  expires a hair after the record it replaces, and readers skip tombstones.
* ``hivemind.DHT`` talks to its background process through one pipe that is not safe to write from two
  threads at once; every call here is sent under a lock and awaited outside it, with a timeout.
* The DHT accepts any msgpack value from any peer unless a record validator says otherwise; a pool's
  processes install one (`coop.swarm.validation`), and everything read back is still parsed
  defensively by :meth:`NodeAnnouncement.from_wire`; records that fail are dropped, never raised.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils.multiaddr import Multiaddr

from coop.errors import InvalidInput, PeerError
from coop.pool.bundle import Credentials
from coop.swarm.allowance import within_allowance
from coop.swarm.announcement import NodeAnnouncement, is_withdrawal, stamp_announcement, stamp_withdrawal
from coop.swarm.node_key import key_of
from coop.swarm.periodic import Periodic

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 9.0
"""A dead node drops out of the directory within this many seconds (plus one refresh period at most)."""

MAX_RECORD_TTL_S = 120.0
"""The longest a node's announcement may be signed to live: a pool's DHT refuses longer ones."""

DEFAULT_TIMEOUT_S = 10.0
"""Upper bound on any single DHT call; hivemind's own RPC timeout is 3 s per peer."""

_TOMBSTONE_MARGIN_S = 1e-3
"""How much later than the withdrawn record a tombstone expires (hivemind needs strictly later)."""


def directory_key(pool_id: str, model_hash: str) -> str:
    """The one DHT key under which all nodes of (pool_id, model_hash) announce themselves.

    Both ids are restricted to ``[A-Za-z0-9._:-]`` by NodeAnnouncement, so ``/`` cannot be forged
    into them and distinct pairs always give distinct keys.
    """
    return f"coop/v1/pools/{pool_id}/models/{model_hash}/nodes"


async def _visible_maddrs(_dht: DHT, node: DHTNode) -> list[Multiaddr]:
    """Runs inside the DHT process (module-level so that it pickles by reference)."""
    return list(await node.get_visible_maddrs())


def _listen_maddr(host: str, port: int) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise InvalidInput(f"host must be an IP address to bind, got {host!r}") from exc
    if not 0 <= port <= 65535:
        raise InvalidInput(f"port must be 0..65535, got {port}")
    return f"/ip{address.version}/{address}/tcp/{port}"


def _check_peers(initial_peers: Sequence[str]) -> list[str]:
    peers = list(initial_peers)
    for peer in peers:
        try:
            Multiaddr(peer)["p2p"]
        except Exception as exc:
            raise InvalidInput(
                f"initial peer {peer!r} is not a multiaddr ending in /p2p/<peer id>, "
                "e.g. /ip4/10.0.0.5/tcp/31337/p2p/12D3KooW..."
            ) from exc
    return peers


class SwarmDirectory:
    """One hivemind DHT peer, used to publish and look up NodeAnnouncements.

    Thread-safe: an Announcer thread and request handlers may share one directory.
    """

    def __init__(self, dht: DHT, timeout_s: float = DEFAULT_TIMEOUT_S, initial_peers: Sequence[str] = ()) -> None:
        """Wrap an already running DHT; most callers want :meth:`start`."""
        self._dht = dht
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._closed = False
        self._initial_peers = list(initial_peers)
        # Latest expiration this directory stored per (key, subkey): withdraw must out-date it.
        self._stored_until: dict[tuple[str, str], float] = {}

    @classmethod
    def start(
        cls,
        initial_peers: Sequence[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        startup_timeout_s: float = 30.0,
        validator: RecordValidatorBase | None = None,
        **dht_kwargs: Any,
    ) -> SwarmDirectory:
        """Start a DHT peer listening on host:port (0 = any free port) and join initial_peers.

        With no initial_peers this peer starts a new swarm. validator decides which records this
        peer stores and believes (a pool's `pool_record_validator`; None in development mode).
        dht_kwargs go to hivemind.DHT (e.g. identity_path, announce_maddrs). Raises PeerError if
        none of the peers answers.
        """
        directory = cls.launch(initial_peers, host, port, timeout_s=timeout_s, validator=validator, **dht_kwargs)
        directory.wait_ready(startup_timeout_s)
        return directory

    @classmethod
    def launch(
        cls,
        initial_peers: Sequence[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        validator: RecordValidatorBase | None = None,
        **dht_kwargs: Any,
    ) -> SwarmDirectory:
        """Fork the DHT process and return at once; call :meth:`wait_ready` before using the directory.

        Lets a process do other start-up work (import and load its model) while its DHT joins the
        swarm. Call it before starting other threads: the DHT process is forked from this one.
        """
        peers = _check_peers(initial_peers)
        dht = DHT(
            initial_peers=peers or None,
            start=False,
            host_maddrs=[_listen_maddr(host, port)],
            record_validators=[] if validator is None else [validator],
            **dht_kwargs,
        )
        dht.run_in_background(await_ready=False)
        return cls(dht, timeout_s=timeout_s, initial_peers=peers)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the DHT process has joined the swarm; shuts it down and raises PeerError if it cannot."""
        try:
            self._dht.wait_until_ready(timeout_s)
        except BaseException as exc:
            self.shutdown()
            if isinstance(exc, TimeoutError):
                raise PeerError(f"DHT peer did not start within {timeout_s:.0f}s") from exc
            if isinstance(exc, Exception):
                raise PeerError(f"could not join the swarm via {self._initial_peers}: {exc}") from exc
            raise

    def _call(self, what: str, send: Callable[[], Any], timeout_s: float | None = None) -> Any:
        """Send one request to the DHT process under the lock, then wait for it outside the lock."""
        timeout = self._timeout_s if timeout_s is None else timeout_s
        if self._closed or not self._dht.is_alive():
            raise PeerError(f"DHT {what} failed: the directory is shut down")
        try:
            with self._lock:
                future = send()
        except Exception as exc:  # e.g. the pipe to a DHT process that just died
            raise PeerError(f"DHT {what} failed: {type(exc).__name__}: {exc}") from exc
        try:
            return future.result(timeout=timeout)
        except TimeoutError as exc:
            future.cancel()
            raise PeerError(f"DHT {what} timed out after {timeout:.1f}s") from exc
        except Exception as exc:
            raise PeerError(f"DHT {what} failed: {type(exc).__name__}: {exc}") from exc

    def visible_maddrs(self) -> list[str]:
        """Multiaddrs (with /p2p/<peer id>) that other peers pass as initial_peers to join this one."""
        maddrs = self._call("visible_maddrs", lambda: self._dht.run_coroutine(_visible_maddrs, return_future=True))
        return [str(maddr) for maddr in maddrs]

    def announce(self, ann: NodeAnnouncement) -> bool:
        """Publish ann until ann.expires_at; returns False if every replica kept a newer record.

        A False is not an error worth raising: it happens when a tombstone or a record from this
        node's previous run expires later; the next refresh with a later expiry wins.
        """
        if ann.expires_at <= time.time():
            raise InvalidInput(f"announcement for node {ann.node_id} has already expired")
        key, subkey = directory_key(ann.pool_id, ann.model_hash), str(key_of(ann))
        ok = self._store_entry(key, subkey, ann.to_wire(), ann.expires_at)
        if ok:
            with self._lock:
                self._stored_until[(key, subkey)] = ann.expires_at
        else:
            logger.debug("DHT kept a newer record than node %s's announcement under %s", ann.node_id, key)
        return ok

    def withdraw(self, ann: NodeAnnouncement, bundle: Credentials | None = None) -> None:
        """Make ann's node disappear from list_nodes now, instead of when its record expires.

        Stores a tombstone, signed with bundle like the node's announcements, that expires just after
        the latest record of this node seen locally or in the DHT (hivemind only replaces a subkey
        with a later-expiring value).
        """
        key, subkey = directory_key(ann.pool_id, ann.model_hash), str(key_of(ann))
        with self._lock:
            latest = self._stored_until.pop((key, subkey), -math.inf)
        latest = max(latest, self._entry_expiration(key, subkey))
        now = time.time()
        if latest <= now:
            return  # nothing live to hide
        tombstone = stamp_withdrawal(ann, now=now, expires_at=latest + _TOMBSTONE_MARGIN_S, bundle=bundle)
        if not self._store_entry(key, subkey, tombstone.to_wire(), tombstone.expires_at):
            raise PeerError(f"could not withdraw node {ann.node_id}: no DHT peer accepted the tombstone")

    def _store_entry(self, key: str, subkey: str, value: object, expiration_time: float) -> bool:
        """Store one subkey entry; True if a replica holds it.

        hivemind reports the answer of whichever replica replied last, so one peer's refusal (a
        peer holding junk under the key, say) can read as failure: a False is checked by reading back.
        """
        ok = self._call(
            "store",
            lambda: self._dht.store(
                key, subkey=subkey, value=value, expiration_time=expiration_time, return_future=True
            ),
        )
        return bool(ok) or self._entry_expiration(key, subkey) == expiration_time

    def _entry_expiration(self, key: str, subkey: str) -> float:
        """When the newest entry under key/subkey expires (-inf if there is none)."""
        found = self._get(key)
        if found is None or not isinstance(found.value, dict) or subkey not in found.value:
            return -math.inf
        return float(found.value[subkey].expiration_time)

    def _get(self, key: str) -> Any:
        return self._call("get", lambda: self._dht.get(key, latest=True, return_future=True))

    def list_nodes(
        self,
        pool_id: str,
        model_hash: str,
        validator: Callable[[NodeAnnouncement], bool] | None = None,
    ) -> list[NodeAnnouncement]:
        """Every live, well-formed node of (pool_id, model_hash), ordered by (start, end, node_id, institution).

        Records that are tombstones, malformed, expired, filed under the wrong key or subkey, or
        rejected by validator (e.g. a signature check) are dropped with a debug log, because one bad
        peer must not make the whole model unroutable; so are a member's nodes beyond the allowance
        its certificate carries (`coop.swarm.allowance`).
        """
        key = directory_key(pool_id, model_hash)
        found = self._get(key)
        if found is None:
            return []
        if not isinstance(found.value, dict):
            logger.debug("ignoring non-dictionary value under %s", key)
            return []
        now = time.time()
        nodes = []
        for subkey, item in found.value.items():
            ann = self._parse(key, subkey, item.value, float(item.expiration_time), now)
            if ann is None:
                continue
            if validator is not None:
                try:
                    accepted = bool(validator(ann))
                except Exception:
                    logger.warning("validator raised on node %s; dropping it", ann.node_id, exc_info=True)
                    continue
                if not accepted:
                    logger.debug("validator rejected node %s under %s", ann.node_id, key)
                    continue
            nodes.append(ann)
        nodes.sort(key=lambda ann: (ann.start, ann.end, ann.node_id, ann.institution))
        return within_allowance(nodes)

    @staticmethod
    def _parse(key: str, subkey: object, value: object, expiration: float, now: float) -> NodeAnnouncement | None:
        if is_withdrawal(value):
            return None  # tombstone left by withdraw
        try:
            ann = NodeAnnouncement.from_wire(value)
        except InvalidInput as exc:
            logger.debug("ignoring record %r under %s: %s", subkey, key, exc)
            return None
        filed_under = (directory_key(ann.pool_id, ann.model_hash), str(key_of(ann)))
        if filed_under != (key, subkey):
            logger.debug("ignoring record %r under %s: it names another key or node", subkey, key)
            return None
        if min(ann.expires_at, expiration) <= now:
            logger.debug("ignoring expired record %r under %s", subkey, key)
            return None
        return ann

    def publish_blob(self, key: str, subkey: str, data: bytes, expires_at: float) -> bool:
        """Store signed pool-wide data (a revocation list) under key/subkey.

        One subkey per version: a writer cannot overwrite another's version, only add its own,
        and readers keep the newest version whose signature checks out.
        """
        return self._store_entry(key, subkey, data, expires_at)

    def fetch_blobs(self, key: str) -> list[bytes]:
        """Every bytes value stored under key: callers verify signatures and keep the newest."""
        found = self._get(key)
        if found is None or not isinstance(found.value, dict):
            return []
        return [item.value for item in found.value.values() if isinstance(item.value, bytes)]

    def shutdown(self) -> None:
        """Stop the DHT process; idempotent. Records this peer stored elsewhere live until they expire."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._dht.shutdown()

    def __enter__(self) -> SwarmDirectory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


class Announcer:
    """Keeps one node in the directory by re-announcing it every refresh_s seconds.

    Each round calls describe() for the node's fresh fields (throughput, free cache), has
    `stamp_announcement` make the record (announced now, expiring in ttl_s, signed with bundle
    when given) and stores it. If the process dies the record lapses within ttl_s; stop()
    withdraws it at once.
    """

    def __init__(
        self,
        directory: SwarmDirectory,
        describe: Callable[[], Mapping[str, Any]],
        ttl_s: float = DEFAULT_TTL_S,
        refresh_s: float | None = None,
        bundle: Credentials | None = None,
    ) -> None:
        refresh = ttl_s / 3 if refresh_s is None else refresh_s
        if not (0 < refresh < ttl_s <= MAX_RECORD_TTL_S):
            raise InvalidInput(
                f"need 0 < refresh_s < ttl_s <= {MAX_RECORD_TTL_S:.0f}, got refresh_s={refresh}, ttl_s={ttl_s}"
            )
        self._directory = directory
        self._describe = describe
        self._bundle = bundle
        self.ttl_s = ttl_s
        self.refresh_s = refresh
        self._refresher = Periodic(self.announce_once, refresh, "coop-announcer")
        self._last: NodeAnnouncement | None = None

    @property
    def last(self) -> NodeAnnouncement | None:
        """The most recent announcement this announcer stored (None before the first and after stop)."""
        return self._last

    def announce_once(self) -> NodeAnnouncement:
        """Make and store one announcement; raises like SwarmDirectory.announce."""
        stamped = stamp_announcement(self._describe(), now=time.time(), ttl_s=self.ttl_s, bundle=self._bundle)
        if not self._directory.announce(stamped):
            logger.warning("DHT kept a later record for node %s; it may stay hidden until then", stamped.node_id)
        self._last = stamped
        return stamped

    def start(self) -> Announcer:
        """Announce once synchronously (so errors surface to the caller), then keep refreshing."""
        self.announce_once()
        self._refresher.start()
        return self

    def stop(self, withdraw: bool = True) -> None:
        """Stop refreshing and, unless withdraw=False, remove the node from the directory now."""
        self._refresher.stop()
        last, self._last = self._last, None  # a second stop() has nothing left to withdraw
        if withdraw and last is not None:
            try:
                self._directory.withdraw(last, self._bundle)
            except PeerError:
                logger.warning("could not withdraw node %s; it lapses in %.0fs", last.node_id, self.ttl_s)
