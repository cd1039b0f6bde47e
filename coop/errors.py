"""Coop's exception tree. Every error a user or a peer can cause is one of these.

    CoopError
    ├── ModelStoreError            a prepared model directory is missing, incomplete or corrupt
    │   ├── ModelNotFound
    │   ├── ModelIntegrityError    a file's sha256 differs from the manifest
    │   └── UnsupportedModel       the source cannot be converted
    ├── SpanOutOfRange             blocks [start, end) do not fit the model
    ├── SessionError
    │   ├── UnknownSession
    │   ├── SessionExists
    │   ├── SessionLimitExceeded   a step beyond the length the session was opened with
    │   └── CacheBudgetExceeded    not enough KV-cache budget left on this engine
    ├── InvalidInput               input from a client or a peer that fails validation
    │   ├── InvalidTensor          wrong dtype, shape or non-finite values
    │   └── InvalidPositions       positions that skip or rewind
    ├── RouteUnavailable           no chain of nodes covers every block
    ├── PeerError                  a remote node failed, vanished or timed out
    ├── Unauthorized               a certificate, signature or key the pool CA does not vouch for
    ├── LedgerError                the ledger database failed or holds something it should not
    │   └── ReceiptRejected        a receipt that must not be booked (forged, inflated, mismatched)
    └── CreditExhausted            an institution's balance is below its credit floor (HTTP 402)

Components raise these; boundaries (gRPC servicers, the HTTP API, the CLI) map them to their
wire form in one place each.
"""

from __future__ import annotations


class CoopError(Exception):
    """Root of every error Coop raises on purpose."""


class ModelStoreError(CoopError):
    pass


class ModelNotFound(ModelStoreError):
    pass


class ModelIntegrityError(ModelStoreError):
    pass


class UnsupportedModel(ModelStoreError):
    pass


class SpanOutOfRange(CoopError):
    pass


class SessionError(CoopError):
    pass


class UnknownSession(SessionError):
    pass


class SessionExists(SessionError):
    pass


class SessionLimitExceeded(SessionError):
    pass


class CacheBudgetExceeded(SessionError):
    def __init__(self, requested_bytes: int, free_bytes: int, budget_bytes: int) -> None:
        super().__init__(
            f"KV cache budget exceeded: this session needs {requested_bytes:,} bytes but only "
            f"{free_bytes:,} of {budget_bytes:,} are free; close idle sessions, ask for a shorter "
            "max_length, or start the node with a larger --cache-budget"
        )
        self.requested_bytes = requested_bytes
        self.free_bytes = free_bytes
        self.budget_bytes = budget_bytes


class InvalidInput(CoopError):
    pass


class InvalidTensor(InvalidInput):
    pass


class InvalidPositions(InvalidInput):
    pass


class RouteUnavailable(CoopError):
    def __init__(self, missing_blocks: list[tuple[int, int]], num_blocks: int) -> None:
        spans = ", ".join(f"{a}:{b}" for a, b in missing_blocks)
        super().__init__(
            f"no live nodes serve blocks {spans} of {num_blocks}; start a node with "
            f"`coop node start --blocks {missing_blocks[0][0]}:{missing_blocks[0][1]}` or wait for one to join"
        )
        self.missing_blocks = missing_blocks
        self.num_blocks = num_blocks


class PeerError(CoopError):
    pass


class Unauthorized(CoopError):
    """Not vouched for by the pool CA: unsigned, forged, expired, revoked, or from another pool."""


class LedgerError(CoopError):
    pass


class ReceiptRejected(LedgerError):
    """A receipt failed a check; the reason is recorded as an audit event."""


class CreditExhausted(CoopError):
    """Requests of an institution whose balance fell below its credit floor."""
