"""Coop's exception tree. Every error a user or a peer can cause is one of these.

    CoopError
    ├── ModelStoreError            a prepared model directory is missing, incomplete or corrupt
    │   ├── ModelNotFound
    │   ├── ModelIntegrityError    a file's sha256 differs from the manifest
    │   └── UnsupportedModel       the source cannot be converted
    ├── SpanOutOfRange             blocks [start, end) do not fit the model
    ├── SessionError
    │   ├── UnknownSession
    │   │   └── SessionDropped     the node closed the session itself: idle, or its events unread
    │   ├── SessionExists
    │   ├── SessionLimitExceeded   a step beyond the length the session was opened with
    │   │   └── InFlightLimitExceeded  too many steps (or bytes of steps) held for a peer or session
    │   ├── NodeDraining           the node is draining or paused: it opens no new session
    │   ├── CacheBudgetExceeded    not enough KV-cache budget left on this engine
    │   │   └── PeerCacheLimitExceeded  the cache is full and the institution holds its fair share of it
    │   └── ReplayUnavailable      (SDK) a failed session cannot be rebuilt: earlier tokens unknown
    ├── InvalidInput               input from a client or a peer that fails validation
    │   ├── InvalidTensor          wrong dtype, shape or non-finite values
    │   ├── InvalidPositions       positions that skip or rewind
    │   ├── ContextLengthExceeded  a session longer than the model's context
    │   ├── RequestError           (HTTP API) a request refused with its own status and OpenAI code
    │   │   ├── RequestTooLarge    (HTTP API) a body over the coordinator's size limit (413)
    │   │   └── RequestLimitExceeded  (HTTP API) too many stop strings, messages, characters or tokens (400)
    │   └── NotFound               (admin view) no such institution
    ├── RouteUnavailable           no chain of nodes covers every block
    ├── PeerError                  a remote node failed, vanished, timed out or reported an error
    ├── Unauthorized               a certificate, signature or key the pool CA does not vouch for
    │   ├── SignInRequired         (admin view) no valid admin session
    │   └── CsrfRejected           (admin view) a state-changing request without the CSRF token
    ├── LedgerError                the ledger database failed or holds something it should not
    │   └── ReceiptRejected        a receipt that must not be booked (forged, inflated, mismatched)
    ├── ReceiptPending             a receipt not bookable yet: its session is not recorded (yet)
    ├── CreditExhausted            an institution's balance is below its credit floor (HTTP 402)
    ├── ApiError                   (SDK) a coordinator refused or failed an HTTP request
    ├── SignInThrottled            (admin view) too many failed sign-ins from one client (429)
    ├── DialBackThrottled          (node) a member asked for more dial-backs than a node makes for it
    └── InvalidSettings            (CLI) a setting's value, from a flag, the environment or a --config file

Components raise these; boundaries (gRPC servicers, the HTTP API, the CLI) map them to their
wire form in one place each. An error a peer reports crosses into the coordinator as a
`PeerError` whose `remote_type` names the peer's own class: a node's `InvalidTensor` is the
node's fault, not the client's.
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


class NodeDraining(SessionError):
    """A node that is draining or paused refuses to open a session; the coordinator routes around it."""


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


class ReplayUnavailable(SessionError):
    """A node failed mid-session and the session cannot be rebuilt: its earlier tokens are unknown.

    Raised by `InferenceSession.step` when failover needs to replay the session on a new route but
    some earlier step was given without `token_ids`.
    """


class InvalidInput(CoopError):
    pass


class InvalidTensor(InvalidInput):
    pass


class InvalidPositions(InvalidInput):
    pass


class RequestError(InvalidInput):
    """A request the API refuses, with the HTTP status and OpenAI error code to answer with."""

    def __init__(self, message: str, *, status: int = 400, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


class NotFound(InvalidInput):
    """No such institution (404)."""


class RouteUnavailable(CoopError):
    def __init__(self, missing_blocks: list[tuple[int, int]], num_blocks: int, model: str = "") -> None:
        """`model`: the name of the model whose blocks are missing, where a coordinator serves several."""
        spans = ", ".join(f"{a}:{b}" for a, b in missing_blocks)
        covered = 1 - sum(b - a for a, b in missing_blocks) / max(num_blocks, 1)
        of_model = f"model {model!r} is {covered:.0%} covered: " if model else ""
        super().__init__(
            f"{of_model}no live nodes serve blocks {spans} of {num_blocks}; start a node with "
            f"`coop node start --blocks {missing_blocks[0][0]}:{missing_blocks[0][1]}` or wait for one to join"
        )
        self.missing_blocks = missing_blocks
        self.num_blocks = num_blocks


class PeerError(CoopError):
    """A remote node failed, vanished, timed out, sent something invalid, or reported an error.

    `remote_type` names the class of the error the peer reported or caused (e.g. "InvalidTensor"),
    for logs; None when the peer did not answer at all. When the peer's error was rebuilt from the
    wire, it is also the `__cause__`.
    """

    # class-level default: instances rebuilt from the wire (`coop.wire.errors`) skip __init__
    remote_type: str | None = None

    def __init__(self, message: str, *, remote_type: str | None = None) -> None:
        super().__init__(message)
        self.remote_type = remote_type


class Unauthorized(CoopError):
    """Not vouched for by the pool CA: unsigned, forged, expired, revoked, or from another pool."""


class SignInRequired(Unauthorized):
    """No valid admin session (pages redirect to the sign-in form, the API answers 401)."""


class CsrfRejected(Unauthorized):
    """A state-changing request without the session's CSRF token (403)."""


class LedgerError(CoopError):
    pass


class ReceiptRejected(LedgerError):
    """A receipt failed a check; the reason is recorded as an audit event."""


class ReceiptPending(CoopError):
    """Not bookable yet: the coordinator has no record of the session (yet)."""


class CreditExhausted(CoopError):
    """Requests of an institution whose balance fell below its credit floor."""


# Codes of failures that may clear up: those the coordinator answers with 502, 503 or 504, and the
# SDK's own. Listed for errors sent mid-stream, after a 200; a unit test keeps them in step with
# `coop.coordinator.http.api_errors.ERROR_TABLE`.
_RETRYABLE_CODES = frozenset(
    {
        # 503: capacity
        "capacity_exceeded",
        "node_draining",
        "receipt_pending",
        "route_unavailable",
        "session_limit_exceeded",
        # 502: a node (or an engine) failed; a retry may get a route without it
        "invalid_positions",
        "invalid_tensor",
        "peer_error",
        "replay_unavailable",
        "session_error",
        "session_exists",
        "span_out_of_range",
        "unknown_session",
        "upstream_error",
        # the SDK's own: the coordinator did not answer
        "connection_error",
        "timeout",
    }
)


class ApiError(CoopError):
    """The coordinator refused or failed a request (or could not be reached: status None).

    `code` is the OpenAI-style error code the server sent, e.g. "model_not_found",
    "context_length_exceeded", "route_unavailable", "peer_error", "connection_error".
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
    ) -> None:
        where = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{message} ({where}{f', {code}' if code else ''})")
        self.message = message
        self.status = status
        self.code = code
        self.type = type
        self.param = param

    @property
    def retryable(self) -> bool:
        """A later attempt may succeed: no route yet, a node failed, or the server was unreachable."""
        return self.status is None or self.status in (502, 503, 504) or self.code in _RETRYABLE_CODES


class RequestTooLarge(RequestError):
    """A request body over the size this coordinator takes: refused before it is read (413)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, status=413, code="request_too_large", param=param)


class RequestLimitExceeded(RequestError):
    """A request over one of the coordinator's limits on stop strings, messages, characters or prompt tokens."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, status=400, code="request_limit_exceeded", param=param)


class SignInThrottled(CoopError):
    """Too many failed admin sign-ins from one client address; it may try again after `retry_after_s`."""

    def __init__(self, message: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ContextLengthExceeded(InvalidInput):
    """A session asked for more tokens than the model's context (its max position embeddings)."""


class PeerCacheLimitExceeded(CacheBudgetExceeded):
    """A node's KV cache is full and this session's institution already holds its fair share of it: a
    capacity refusal (the node is alive and may have room for others), never a liveness failure."""

    def __init__(self, consumer: str, requested_bytes: int, held_bytes: int, share_bytes: int) -> None:
        SessionError.__init__(
            self,
            f"this node's KV cache is full and {consumer} already holds {held_bytes:,} bytes of it; this session "
            f"needs {requested_bytes:,} more, beyond its fair share of {share_bytes:,} bytes while others use "
            "the rest: close idle sessions, ask for a shorter max_length, or route to another node",
        )
        self.requested_bytes = requested_bytes
        self.free_bytes = max(share_bytes - held_bytes, 0)
        self.budget_bytes = share_bytes


class InFlightLimitExceeded(SessionLimitExceeded):
    """A node already holds as many steps, or bytes of steps, from this peer or session as it takes at once."""


class SessionDropped(UnknownSession):
    """The node closed the session itself, freeing its cache: idle past the node's timeout, or its
    coordinator left its events unread."""


class DialBackThrottled(CoopError):
    """A member asked a node for more dial-backs (`coop node doctor`) than it makes per institution, or
    the node is already dialling as many as it does at once."""


class InvalidSettings(CoopError):
    """A bad setting, named with where it came from (flag, environment variable, or file and key)."""
