"""Admin sign-in: the pool's admin token buys a session; every form carries the session's CSRF token.

The session cookie holds only a random id (HttpOnly, SameSite=Strict, Path=/admin); sessions live
in this process, so signing out ends one at once and a coordinator restart ends them all. The
sign-in form is protected too, by a double-submit token: a cookie and a hidden field that must
match. The JSON API also takes ``Authorization: Bearer <admin token>`` for scripts; a bearer token
cannot be sent by another site's page, so such calls need no CSRF token. Wrong tokens, by form or
by bearer, are throttled per client address (`SignInThrottle`): the socket peer's, or the one a
trusted proxy forwarded for (`client_address`), never one a client names in a header itself.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response

from coop.config import CoordinatorSettings
from coop.errors import CoopError, CsrfRejected, InvalidInput, SignInRequired, SignInThrottled
from coop.pool.registry import PoolInfo

log = logging.getLogger(__name__)

SESSION_COOKIE = "coop_admin_session"
LOGIN_COOKIE = "coop_admin_login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
COOKIE_PATH = "/admin"
MAX_SESSIONS = 256  # the oldest session is dropped beyond this many
LOGIN_TOKEN_TTL_S = 3600


@dataclass(frozen=True)
class AdminSession:
    session_id: str
    identity: str
    csrf_token: str
    expires_at: float


class SessionStore:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._sessions: dict[str, AdminSession] = {}
        self._flashes: dict[str, list[tuple[str, str]]] = {}  # session id -> (kind, message) to show once
        self._lock = threading.Lock()

    def open(self, identity: str) -> AdminSession:
        now = self._clock()
        session = AdminSession(secrets.token_urlsafe(32), identity, secrets.token_urlsafe(32), now + self.ttl_s)
        with self._lock:
            self._sessions = {sid: s for sid, s in self._sessions.items() if s.expires_at > now}
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[session.session_id] = session
            self._flashes = {sid: f for sid, f in self._flashes.items() if sid in self._sessions}
        return session

    def get(self, session_id: str | None) -> AdminSession | None:
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires_at <= self._clock():
                del self._sessions[session_id]
                return None
        return session

    def close(self, session_id: str | None) -> AdminSession | None:
        with self._lock:
            self._flashes.pop(session_id or "", None)
            return self._sessions.pop(session_id or "", None)

    def flash(self, session_id: str, kind: str, message: str) -> None:
        """A message for the next page this session sees (after a redirect)."""
        with self._lock:
            if session_id in self._sessions:
                self._flashes.setdefault(session_id, []).append((kind, message))

    def pop_flashes(self, session_id: str) -> list[tuple[str, str]]:
        with self._lock:
            return self._flashes.pop(session_id, [])


def tokens_match(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


class SignInThrottle:
    """Admin sign-ins per client address, as token buckets: `burst` wrong tokens at once, then one
    more every `refill_s` seconds.

    Every attempt takes a token before the admin token is checked, and a right one gives it back, so
    concurrent guesses cannot outrun the bucket; an empty bucket refuses every attempt unchecked,
    right or wrong, so guessing is no faster than the refill. Buckets of the `max_clients` addresses
    seen last are kept (forgetting a full bucket changes nothing).
    """

    def __init__(
        self,
        burst: int = CoordinatorSettings.model_fields["admin_sign_in_burst"].default,
        refill_s: float = CoordinatorSettings.model_fields["admin_sign_in_refill_s"].default,
        *,
        max_clients: int = 4096,
        trusted_proxies: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.trusted_proxies = proxy_networks(trusted_proxies)
        self.refill_s = refill_s
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, as of)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, client: str) -> None:
        """Take one attempt from client's bucket, or SignInThrottled (429) when it has none left."""
        now = self._clock()
        with self._lock:
            tokens = self._tokens(client, now)
            if tokens < 1:
                self._counts["sign_in_throttled"] += 1
                wait_s = math.ceil((1 - tokens) * self.refill_s)
                raise SignInThrottled(
                    f"Too many wrong admin tokens from {client}: try again in {wait_s} s", retry_after_s=wait_s
                )
            self._store(client, tokens - 1, now)

    def give_back(self, client: str) -> None:
        """The attempt taken was right: it costs nothing."""
        now = self._clock()
        with self._lock:
            self._store(client, self._tokens(client, now) + 1, now)

    def failed(self) -> None:
        with self._lock:
            self._counts["admin_sign_in_failed"] += 1

    def counts(self) -> dict[str, int]:
        """Wrong tokens, and attempts refused unchecked, since the start."""
        with self._lock:
            return dict(self._counts)

    def _tokens(self, client: str, now: float) -> float:
        tokens, since = self._buckets.get(client, (self.burst, now))
        return min(self.burst, tokens + (now - since) / self.refill_s)

    def _store(self, client: str, tokens: float, now: float) -> None:
        self._buckets[client] = (min(self.burst, tokens), now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def proxy_networks(proxies: Sequence[str]) -> tuple[Network, ...]:
    """The trusted proxies setting as networks; InvalidInput naming the entry that is none."""
    networks = []
    for proxy in proxies:
        try:
            networks.append(ipaddress.ip_network(proxy.strip(), strict=False))
        except ValueError as exc:
            raise InvalidInput(f"trusted proxy {proxy!r} is not an IP address or network (CIDR)") from exc
    return tuple(networks)


def _within(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(request: Request, trusted_proxies: Sequence[Network] = ()) -> str:
    """Whom a request counts against: its socket peer, never a header the client wrote itself.

    Only when the peer is a trusted proxy is X-Forwarded-For read, from the right: the first address
    that is not a trusted proxy is the client (addresses further left were written by the client).
    """
    peer = request.client.host if request.client else "unknown"
    if not _within(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for hop in ",".join(request.headers.getlist("x-forwarded-for")).split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _within(hop, trusted_proxies):
            return hop if _is_ip(hop) else peer
    return peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class AdminAuth:
    def __init__(
        self, pool_dir: Path, *, ttl_s: float, secure_cookies: bool | None, throttle: SignInThrottle | None = None
    ) -> None:
        self.pool_dir = pool_dir
        self.sessions = SessionStore(ttl_s)
        self.secure_cookies = secure_cookies
        self.throttle = throttle or SignInThrottle()

    def client(self, request: Request) -> str:
        """The address request's sign-in attempts count against (see `client_address`)."""
        return client_address(request, self.throttle.trusted_proxies)

    def sign_in(self, client: str, token: str) -> bool:
        """Whether token is the pool's admin token; SignInThrottled while client has guessed wrong too often."""
        self.throttle.take(client)
        if self.check_admin_token(token):
            self.throttle.give_back(client)
            return True
        self.throttle.failed()
        return False

    def check_admin_token(self, token: str) -> bool:
        """Read pool.toml on every attempt: a rotated admin token takes effect at once."""
        try:
            return bool(token) and PoolInfo.load(self.pool_dir).check_admin_token(token)
        except CoopError as exc:
            log.warning("cannot check the admin token against %s: %s", self.pool_dir, exc)
            return False

    def session(self, request: Request) -> AdminSession:
        """The request's admin session, or SignInRequired."""
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise SignInRequired("sign in with the pool's admin token")
        return session

    def api_identity(self, request: Request) -> tuple[str, AdminSession | None]:
        """(who, session) for a JSON API call: a session cookie, or the admin token as a bearer token."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            if self.sign_in(self.client(request), token.strip()):
                return "admin (api)", None
            raise SignInRequired("the bearer token is not this pool's admin token")
        session = self.session(request)
        return session.identity, session

    @staticmethod
    def require_csrf(session: AdminSession | None, given: str | None) -> None:
        if session is not None and not tokens_match(session.csrf_token, given):
            raise CsrfRejected("the form's CSRF token is missing or stale: reload the page and try again")

    def set_cookie(self, request: Request, response: Response, name: str, value: str, max_age: int) -> None:
        secure = request.url.scheme == "https" if self.secure_cookies is None else self.secure_cookies
        response.set_cookie(
            name, value, max_age=max_age, path=COOKIE_PATH, secure=secure, httponly=True, samesite="strict"
        )

    def clear_cookie(self, response: Response, name: str) -> None:
        response.delete_cookie(name, path=COOKIE_PATH, httponly=True, samesite="strict")
