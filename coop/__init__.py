"""Coop: a cooperative compute pool for large language models."""

from coop.errors import (
    CacheBudgetExceeded,
    CoopError,
    InvalidInput,
    InvalidPositions,
    InvalidTensor,
    ModelIntegrityError,
    ModelNotFound,
    ModelStoreError,
    PeerError,
    RouteUnavailable,
    SessionError,
    SessionExists,
    SessionLimitExceeded,
    SpanOutOfRange,
    Unauthorized,
    UnknownSession,
    UnsupportedModel,
)

__version__ = "0.1.0"

__all__ = [
    "CacheBudgetExceeded",
    "CoopError",
    "InvalidInput",
    "InvalidPositions",
    "InvalidTensor",
    "ModelIntegrityError",
    "ModelNotFound",
    "ModelStoreError",
    "PeerError",
    "RouteUnavailable",
    "SessionError",
    "SessionExists",
    "SessionLimitExceeded",
    "SpanOutOfRange",
    "Unauthorized",
    "UnknownSession",
    "UnsupportedModel",
    "__version__",
]
