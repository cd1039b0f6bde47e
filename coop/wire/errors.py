"""Map Coop's exceptions to the wire `Error` message and back.

A node that fails a step reports it as an `Error`; the coordinator turns it back into the same exception
class, with the same message, so callers can handle a remote `CacheBudgetExceeded` exactly like a local
one. This module is the one place that mapping lives.
"""

from __future__ import annotations

from coop.errors import (
    CacheBudgetExceeded,
    ContextLengthExceeded,
    CoopError,
    InFlightLimitExceeded,
    InvalidInput,
    InvalidPositions,
    InvalidTensor,
    NodeDraining,
    PeerCacheLimitExceeded,
    PeerError,
    SessionDropped,
    SessionExists,
    SessionLimitExceeded,
    SpanOutOfRange,
    Unauthorized,
    UnknownSession,
)
from coop.wire.generated import coop_pb2 as pb

#: Exception class -> wire code. Subclasses take the code of their nearest listed ancestor, so
#: InvalidTensor maps to INVALID_TENSOR while any other InvalidInput maps to INVALID_REQUEST.
CODE_FOR_CLASS: dict[type[CoopError], pb.ErrorCode] = {
    InvalidTensor: pb.INVALID_TENSOR,
    InvalidPositions: pb.INVALID_POSITIONS,
    UnknownSession: pb.UNKNOWN_SESSION,
    SessionExists: pb.SESSION_EXISTS,
    CacheBudgetExceeded: pb.CACHE_BUDGET_EXCEEDED,
    SessionLimitExceeded: pb.SESSION_LIMIT_EXCEEDED,
    SpanOutOfRange: pb.SPAN_MISMATCH,
    PeerError: pb.PEER_UNAVAILABLE,
    InvalidInput: pb.INVALID_REQUEST,
    Unauthorized: pb.UNAUTHENTICATED,
    PeerCacheLimitExceeded: pb.PEER_CACHE_LIMIT_EXCEEDED,
    InFlightLimitExceeded: pb.IN_FLIGHT_LIMIT_EXCEEDED,
    SessionDropped: pb.SESSION_DROPPED,
    ContextLengthExceeded: pb.CONTEXT_LENGTH_EXCEEDED,
    NodeDraining: pb.NODE_DRAINING,
}

#: Wire code -> exception class. Codes with no class of their own (INTERNAL, ERROR_UNSPECIFIED,
#: codes added after this build) become a plain CoopError.
CLASS_FOR_CODE: dict[int, type[CoopError]] = {code: cls for cls, code in CODE_FOR_CLASS.items()}


def error_to_proto(exc: BaseException) -> pb.Error:
    """Describe ``exc`` for the wire. Anything that is not a mapped CoopError is INTERNAL.

    CoopError messages are sent unchanged; for other exceptions the type name is included, since the
    message alone ("list index out of range") would not tell the remote side much.
    """
    for cls in type(exc).__mro__:
        code = CODE_FOR_CLASS.get(cls)
        if code is not None:
            return pb.Error(code=code, message=str(exc))
    message = str(exc) if isinstance(exc, CoopError) else f"{type(exc).__name__}: {exc}"
    return pb.Error(code=pb.INTERNAL, message=message)


def error_from_proto(err: pb.Error) -> CoopError:
    """Rebuild the exception a remote side reported, keeping its class and message.

    Built with ``cls.__new__`` + ``Exception.__init__`` so classes whose ``__init__`` takes structured
    arguments (CacheBudgetExceeded) can be recreated from the message alone; such instances carry the
    message only, not the structured attributes (``requested_bytes`` etc. are absent).
    """
    cls = CLASS_FOR_CODE.get(int(err.code), CoopError)
    exc = cls.__new__(cls)
    Exception.__init__(exc, err.message)
    return exc
