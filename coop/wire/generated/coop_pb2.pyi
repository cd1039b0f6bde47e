from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_UNSPECIFIED: _ClassVar[ErrorCode]
    INVALID_TENSOR: _ClassVar[ErrorCode]
    INVALID_POSITIONS: _ClassVar[ErrorCode]
    UNKNOWN_SESSION: _ClassVar[ErrorCode]
    SESSION_EXISTS: _ClassVar[ErrorCode]
    CACHE_BUDGET_EXCEEDED: _ClassVar[ErrorCode]
    SESSION_LIMIT_EXCEEDED: _ClassVar[ErrorCode]
    SPAN_MISMATCH: _ClassVar[ErrorCode]
    PEER_UNAVAILABLE: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
    INVALID_REQUEST: _ClassVar[ErrorCode]
    UNAUTHENTICATED: _ClassVar[ErrorCode]
    PEER_CACHE_LIMIT_EXCEEDED: _ClassVar[ErrorCode]
    IN_FLIGHT_LIMIT_EXCEEDED: _ClassVar[ErrorCode]
    SESSION_DROPPED: _ClassVar[ErrorCode]
    CONTEXT_LENGTH_EXCEEDED: _ClassVar[ErrorCode]
    NODE_DRAINING: _ClassVar[ErrorCode]
ERROR_UNSPECIFIED: ErrorCode
INVALID_TENSOR: ErrorCode
INVALID_POSITIONS: ErrorCode
UNKNOWN_SESSION: ErrorCode
SESSION_EXISTS: ErrorCode
CACHE_BUDGET_EXCEEDED: ErrorCode
SESSION_LIMIT_EXCEEDED: ErrorCode
SPAN_MISMATCH: ErrorCode
PEER_UNAVAILABLE: ErrorCode
INTERNAL: ErrorCode
INVALID_REQUEST: ErrorCode
UNAUTHENTICATED: ErrorCode
PEER_CACHE_LIMIT_EXCEEDED: ErrorCode
IN_FLIGHT_LIMIT_EXCEEDED: ErrorCode
SESSION_DROPPED: ErrorCode
CONTEXT_LENGTH_EXCEEDED: ErrorCode
NODE_DRAINING: ErrorCode

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("endpoint", "start", "end", "node_id", "institution")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    start: int
    end: int
    node_id: str
    institution: str
    def __init__(self, endpoint: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., node_id: _Optional[str] = ..., institution: _Optional[str] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("session_id", "hops")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    hops: _containers.RepeatedCompositeFieldContainer[Hop]
    def __init__(self, session_id: _Optional[str] = ..., hops: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "model_hash", "start", "end", "throughput_tps", "free_cache_bytes", "active_sessions", "counters", "reserved_cache_bytes", "used_cache_bytes", "steps_in_flight", "in_flight_bytes", "queued_steps", "open_channels", "limits", "state", "weight_layout")
    class Counters(_message.Message):
        __slots__ = ("steps_run", "pushes_sent", "results_sent", "limited")
        class LimitedEntry(_message.Message):
            __slots__ = ("key", "value")
            KEY_FIELD_NUMBER: _ClassVar[int]
            VALUE_FIELD_NUMBER: _ClassVar[int]
            key: str
            value: int
            def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
        STEPS_RUN_FIELD_NUMBER: _ClassVar[int]
        PUSHES_SENT_FIELD_NUMBER: _ClassVar[int]
        RESULTS_SENT_FIELD_NUMBER: _ClassVar[int]
        LIMITED_FIELD_NUMBER: _ClassVar[int]
        steps_run: int
        pushes_sent: int
        results_sent: int
        limited: _containers.ScalarMap[str, int]
        def __init__(self, steps_run: _Optional[int] = ..., pushes_sent: _Optional[int] = ..., results_sent: _Optional[int] = ..., limited: _Optional[_Mapping[str, int]] = ...) -> None: ...
    class Limits(_message.Message):
        __slots__ = ("cache_budget_bytes", "sessions_per_peer", "max_length", "in_flight_bytes_per_peer", "steps_in_flight_per_peer", "steps_in_flight_per_session", "events_per_session", "idle_timeout_s", "channels")
        CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
        SESSIONS_PER_PEER_FIELD_NUMBER: _ClassVar[int]
        MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
        IN_FLIGHT_BYTES_PER_PEER_FIELD_NUMBER: _ClassVar[int]
        STEPS_IN_FLIGHT_PER_PEER_FIELD_NUMBER: _ClassVar[int]
        STEPS_IN_FLIGHT_PER_SESSION_FIELD_NUMBER: _ClassVar[int]
        EVENTS_PER_SESSION_FIELD_NUMBER: _ClassVar[int]
        IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
        CHANNELS_FIELD_NUMBER: _ClassVar[int]
        cache_budget_bytes: int
        sessions_per_peer: int
        max_length: int
        in_flight_bytes_per_peer: int
        steps_in_flight_per_peer: int
        steps_in_flight_per_session: int
        events_per_session: int
        idle_timeout_s: float
        channels: int
        def __init__(self, cache_budget_bytes: _Optional[int] = ..., sessions_per_peer: _Optional[int] = ..., max_length: _Optional[int] = ..., in_flight_bytes_per_peer: _Optional[int] = ..., steps_in_flight_per_peer: _Optional[int] = ..., steps_in_flight_per_session: _Optional[int] = ..., events_per_session: _Optional[int] = ..., idle_timeout_s: _Optional[float] = ..., channels: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TPS_FIELD_NUMBER: _ClassVar[int]
    FREE_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEPS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_STEPS_FIELD_NUMBER: _ClassVar[int]
    OPEN_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model_hash: str
    start: int
    end: int
    throughput_tps: float
    free_cache_bytes: int
    active_sessions: int
    counters: NodeInfo.Counters
    reserved_cache_bytes: int
    used_cache_bytes: int
    steps_in_flight: int
    in_flight_bytes: int
    queued_steps: int
    open_channels: int
    limits: NodeInfo.Limits
    state: str
    weight_layout: str
    def __init__(self, node_id: _Optional[str] = ..., model_hash: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., throughput_tps: _Optional[float] = ..., free_cache_bytes: _Optional[int] = ..., active_sessions: _Optional[int] = ..., counters: _Optional[_Union[NodeInfo.Counters, _Mapping]] = ..., reserved_cache_bytes: _Optional[int] = ..., used_cache_bytes: _Optional[int] = ..., steps_in_flight: _Optional[int] = ..., in_flight_bytes: _Optional[int] = ..., queued_steps: _Optional[int] = ..., open_channels: _Optional[int] = ..., limits: _Optional[_Union[NodeInfo.Limits, _Mapping]] = ..., state: _Optional[str] = ..., weight_layout: _Optional[str] = ...) -> None: ...

class SessionControl(_message.Message):
    __slots__ = ("open", "close")
    class Open(_message.Message):
        __slots__ = ("session_id", "max_length", "start", "end", "priority", "node_id", "sketch_seed", "sketch_dims", "first_step", "consumer")
        SESSION_ID_FIELD_NUMBER: _ClassVar[int]
        MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
        START_FIELD_NUMBER: _ClassVar[int]
        END_FIELD_NUMBER: _ClassVar[int]
        PRIORITY_FIELD_NUMBER: _ClassVar[int]
        NODE_ID_FIELD_NUMBER: _ClassVar[int]
        SKETCH_SEED_FIELD_NUMBER: _ClassVar[int]
        SKETCH_DIMS_FIELD_NUMBER: _ClassVar[int]
        FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
        CONSUMER_FIELD_NUMBER: _ClassVar[int]
        session_id: str
        max_length: int
        start: int
        end: int
        priority: float
        node_id: str
        sketch_seed: int
        sketch_dims: int
        first_step: StepRequest
        consumer: str
        def __init__(self, session_id: _Optional[str] = ..., max_length: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., priority: _Optional[float] = ..., node_id: _Optional[str] = ..., sketch_seed: _Optional[int] = ..., sketch_dims: _Optional[int] = ..., first_step: _Optional[_Union[StepRequest, _Mapping]] = ..., consumer: _Optional[str] = ...) -> None: ...
    class Close(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: SessionControl.Open
    close: SessionControl.Close
    def __init__(self, open: _Optional[_Union[SessionControl.Open, _Mapping]] = ..., close: _Optional[_Union[SessionControl.Close, _Mapping]] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("opened", "result", "failed", "draining")
    class Opened(_message.Message):
        __slots__ = ("session_id", "cache_bytes")
        SESSION_ID_FIELD_NUMBER: _ClassVar[int]
        CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
        session_id: str
        cache_bytes: int
        def __init__(self, session_id: _Optional[str] = ..., cache_bytes: _Optional[int] = ...) -> None: ...
    class Result(_message.Message):
        __slots__ = ("session_id", "step_id", "hidden", "sketches")
        SESSION_ID_FIELD_NUMBER: _ClassVar[int]
        STEP_ID_FIELD_NUMBER: _ClassVar[int]
        HIDDEN_FIELD_NUMBER: _ClassVar[int]
        SKETCHES_FIELD_NUMBER: _ClassVar[int]
        session_id: str
        step_id: int
        hidden: Tensor
        sketches: _containers.RepeatedCompositeFieldContainer[Sketch]
        def __init__(self, session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., sketches: _Optional[_Iterable[_Union[Sketch, _Mapping]]] = ...) -> None: ...
    class Failed(_message.Message):
        __slots__ = ("session_id", "step_id", "error")
        SESSION_ID_FIELD_NUMBER: _ClassVar[int]
        STEP_ID_FIELD_NUMBER: _ClassVar[int]
        ERROR_FIELD_NUMBER: _ClassVar[int]
        session_id: str
        step_id: int
        error: Error
        def __init__(self, session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
    class Draining(_message.Message):
        __slots__ = ("session_id", "deadline_s")
        SESSION_ID_FIELD_NUMBER: _ClassVar[int]
        DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
        session_id: str
        deadline_s: float
        def __init__(self, session_id: _Optional[str] = ..., deadline_s: _Optional[float] = ...) -> None: ...
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    opened: SessionEvent.Opened
    result: SessionEvent.Result
    failed: SessionEvent.Failed
    draining: SessionEvent.Draining
    def __init__(self, opened: _Optional[_Union[SessionEvent.Opened, _Mapping]] = ..., result: _Optional[_Union[SessionEvent.Result, _Mapping]] = ..., failed: _Optional[_Union[SessionEvent.Failed, _Mapping]] = ..., draining: _Optional[_Union[SessionEvent.Draining, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "step_id", "hidden", "start_position", "route", "route_signature", "rewind", "rewind_signature", "sketches")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    REWIND_FIELD_NUMBER: _ClassVar[int]
    REWIND_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SKETCHES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_id: int
    hidden: Tensor
    start_position: int
    route: bytes
    route_signature: bytes
    rewind: bool
    rewind_signature: bytes
    sketches: _containers.RepeatedCompositeFieldContainer[Sketch]
    def __init__(self, session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., start_position: _Optional[int] = ..., route: _Optional[bytes] = ..., route_signature: _Optional[bytes] = ..., rewind: _Optional[bool] = ..., rewind_signature: _Optional[bytes] = ..., sketches: _Optional[_Iterable[_Union[Sketch, _Mapping]]] = ...) -> None: ...

class Rewind(_message.Message):
    __slots__ = ("session_id", "step_id", "start_position", "tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_id: int
    start_position: int
    tokens: int
    def __init__(self, session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., start_position: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class Sketch(_message.Message):
    __slots__ = ("node_id", "input", "output", "input_digest", "output_digest")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    input: Tensor
    output: Tensor
    input_digest: bytes
    output_digest: bytes
    def __init__(self, node_id: _Optional[str] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ..., input_digest: _Optional[bytes] = ..., output_digest: _Optional[bytes] = ...) -> None: ...

class StepAck(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: Error
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ReceiptsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class SignedReceipt(_message.Message):
    __slots__ = ("body", "signature", "certificate_pem", "receipt_id")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    certificate_pem: bytes
    receipt_id: str
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ..., receipt_id: _Optional[str] = ...) -> None: ...

class ReceiptBatch(_message.Message):
    __slots__ = ("receipts",)
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    receipts: _containers.RepeatedCompositeFieldContainer[SignedReceipt]
    def __init__(self, receipts: _Optional[_Iterable[_Union[SignedReceipt, _Mapping]]] = ...) -> None: ...

class ReceiptAck(_message.Message):
    __slots__ = ("booked", "rejected")
    BOOKED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    booked: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, booked: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[str]] = ...) -> None: ...

class ReceiptAckReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RelayStep(_message.Message):
    __slots__ = ("hidden", "start_position", "token_ids")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    start_position: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., start_position: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DialBackRequest(_message.Message):
    __slots__ = ("endpoint", "node_id")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    node_id: str
    def __init__(self, endpoint: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class DialBackReply(_message.Message):
    __slots__ = ("reachable", "error", "peer_time_unix_s")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PEER_TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    error: str
    peer_time_unix_s: float
    def __init__(self, reachable: _Optional[bool] = ..., error: _Optional[str] = ..., peer_time_unix_s: _Optional[float] = ...) -> None: ...

class ControlRequest(_message.Message):
    __slots__ = ("action",)
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[ControlRequest.Action]
        DRAIN: _ClassVar[ControlRequest.Action]
        PAUSE: _ClassVar[ControlRequest.Action]
        RESUME: _ClassVar[ControlRequest.Action]
    ACTION_UNSPECIFIED: ControlRequest.Action
    DRAIN: ControlRequest.Action
    PAUSE: ControlRequest.Action
    RESUME: ControlRequest.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    action: ControlRequest.Action
    def __init__(self, action: _Optional[_Union[ControlRequest.Action, str]] = ...) -> None: ...

class ControlReply(_message.Message):
    __slots__ = ("state", "active_sessions")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    state: str
    active_sessions: int
    def __init__(self, state: _Optional[str] = ..., active_sessions: _Optional[int] = ...) -> None: ...
