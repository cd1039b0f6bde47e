"""API keys: who is asking, and whether they may ask for this much right now.

`Authorization: Bearer <key>` resolves to the institution that spends for the request, through
the pool's `api_keys.json` (only sha256 digests on disk). The file is re-read when it changes, so
a revoked key stops working at its next request. Each key may hold at most
`max_concurrent_requests_per_key` requests at once (an SDK relay session counts as one for as
long as it is open) and ask for at most `max_tokens_per_request`.
Without a key file the coordinator is in development mode and serves anyone.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coop.errors import RequestError
from coop.pool.api_keys import ApiKeyStore, api_key_digest
from coop.pool.bundle import PoolLimits


@dataclass(frozen=True)
class Caller:
    institution: str | None  # None in development mode
    key_digest: str | None


ANONYMOUS = Caller(None, None)


class ApiKeyGate:
    def __init__(self, keys_file: Path | None, limits: PoolLimits | None = None) -> None:
        self.keys_file = keys_file
        self.limits = limits or PoolLimits()
        self._store: ApiKeyStore | None = None
        self._stamp: tuple[int, int] | None = None
        self._active: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _keys(self) -> ApiKeyStore:
        assert self.keys_file is not None
        stat = self.keys_file.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if self._store is None or stamp != self._stamp:
            self._store, self._stamp = ApiKeyStore.load(self.keys_file), stamp
        return self._store

    def identify(self, authorization: str | None) -> Caller:
        if self.keys_file is None:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise RequestError(
                "missing API key: send `Authorization: Bearer <key>` (create one with `coop member key create`)",
                status=401,
                code="invalid_api_key",
            )
        digest = api_key_digest(key.strip())
        institution = self._keys().resolve_digest(digest)
        if institution is None:
            raise RequestError("unknown or revoked API key", status=401, code="invalid_api_key")
        return Caller(institution, digest)

    def check_max_tokens(self, caller: Caller, requested: int | None) -> None:
        limit = self.limits.max_tokens_per_request
        if caller.key_digest is not None and requested is not None and requested > limit:
            raise RequestError(
                f"max_tokens {requested} is over this pool's limit of {limit} per request",
                status=429,
                code="max_tokens_limit",
                param="max_tokens",
            )

    @contextmanager
    def slot(self, caller: Caller) -> Iterator[None]:
        """Hold one of the caller's concurrent-request slots for the duration of the block."""
        if caller.key_digest is None:
            yield
            return
        limit = self.limits.max_concurrent_requests_per_key
        with self._lock:
            if self._active[caller.key_digest] >= limit:
                raise RequestError(
                    f"this API key already has {limit} requests in flight or sessions open, the pool's limit; "
                    "retry when one ends",
                    status=429,
                    code="concurrency_limit",
                )
            self._active[caller.key_digest] += 1
        try:
            yield
        finally:
            with self._lock:
                self._active[caller.key_digest] -= 1
