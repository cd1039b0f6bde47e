"""Tensor and error conversion between torch/Coop exceptions and the wire messages."""

from __future__ import annotations

from typing import cast

import pytest
import torch

from coop.errors import (
    CacheBudgetExceeded,
    CoopError,
    InvalidInput,
    InvalidPositions,
    InvalidTensor,
    PeerError,
    RouteUnavailable,
    SessionExists,
    SessionLimitExceeded,
    SpanOutOfRange,
    Unauthorized,
    UnknownSession,
)
from coop.wire.errors import error_from_proto, error_to_proto
from coop.wire.generated import coop_pb2 as pb
from coop.wire.tensors import MAX_TENSOR_BYTES, tensor_from_proto, tensor_to_proto

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_DTYPES = [*FLOAT_DTYPES, torch.int64]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=gen, dtype=torch.int64)
    return (torch.randn(shape, generator=gen) * 100).to(dtype)


def _roundtrip(t: torch.Tensor, **kwargs: object) -> torch.Tensor:
    # Through real serialized bytes, as on the wire.
    msg = pb.Tensor.FromString(tensor_to_proto(t).SerializeToString())
    return tensor_from_proto(msg, **kwargs)  # type: ignore[arg-type]


def _msg(data: bytes = b"\0" * 16, dtype: str = "float32", shape: tuple[int, ...] = (2, 2)) -> pb.Tensor:
    return pb.Tensor(data=data, dtype=dtype, shape=list(shape))


# --- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (1,), (1, 3, 64), (2, 5, 7, 3)], ids=str)
def test_roundtrip_is_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _sample(dtype, shape)
    out = _roundtrip(t)
    assert out.dtype == dtype
    assert out.shape == t.shape
    assert torch.equal(out, t)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (1, 0, 576), (0, 0)], ids=str)
def test_roundtrip_empty(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = torch.empty(shape, dtype=dtype)
    msg = tensor_to_proto(t)
    assert msg.data == b""
    out = _roundtrip(t)
    assert out.dtype == dtype
    assert out.shape == t.shape


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_roundtrip_large(dtype: torch.dtype) -> None:
    t = _sample(dtype, (1, 512, 4096))  # 2M elements, 4-16 MiB
    assert torch.equal(_roundtrip(t), t)


def test_wire_bytes_are_little_endian_row_major() -> None:
    msg = tensor_to_proto(torch.tensor([[1, 2], [3, 4]], dtype=torch.int64))
    assert msg.dtype == "int64"
    assert list(msg.shape) == [2, 2]
    assert msg.data == b"".join(i.to_bytes(8, "little") for i in (1, 2, 3, 4))
    assert tensor_to_proto(torch.tensor([1.0], dtype=torch.bfloat16)).data == b"\x80\x3f"


def test_non_contiguous_and_grad_tensors_are_sent_as_their_values() -> None:
    base = _sample(torch.float32, (4, 6))
    t = base.t()[1:, ::2]
    assert not t.is_contiguous()
    assert torch.equal(_roundtrip(t), t)
    g = torch.ones(3, requires_grad=True) * 2
    assert torch.equal(_roundtrip(g), torch.full((3,), 2.0))


def test_decoded_tensor_is_writable_and_independent_of_message() -> None:
    msg = tensor_to_proto(torch.zeros(4))
    out = tensor_from_proto(msg)
    out += 1  # would fail or warn on a read-only buffer
    assert torch.equal(tensor_from_proto(msg), torch.zeros(4))


def test_expected_shape_wildcards_and_dtype_accept_matching() -> None:
    t = _sample(torch.bfloat16, (1, 3, 576))
    out = _roundtrip(t, expected_dtype=torch.bfloat16, expected_shape=(1, None, 576))
    assert torch.equal(out, t)


def test_unsupported_dtype_cannot_be_sent() -> None:
    with pytest.raises(InvalidTensor, match="int32"):
        tensor_to_proto(torch.zeros(2, dtype=torch.int32))


# --- validation failures -----------------------------------------------------------------------------


def test_unknown_dtype_name() -> None:
    with pytest.raises(InvalidTensor, match=r"unknown dtype 'float64'; expected one of float32, float16"):
        tensor_from_proto(_msg(dtype="float64"))


def test_empty_dtype_name() -> None:
    with pytest.raises(InvalidTensor, match="unknown dtype ''"):
        tensor_from_proto(_msg(dtype=""))


@pytest.mark.parametrize("length", [15, 17, 0])
def test_data_length_mismatch(length: int) -> None:
    with pytest.raises(InvalidTensor, match=rf"has {length} bytes of data but shape \(2, 2\) of float32 needs 16"):
        tensor_from_proto(_msg(data=b"\0" * length))


def test_negative_dimension() -> None:
    with pytest.raises(InvalidTensor, match=r"negative dimension in shape \(2, -2\)"):
        tensor_from_proto(_msg(shape=(2, -2)))


def test_too_large_by_shape_is_rejected_before_reading_data() -> None:
    # A hostile shape claiming ~2^70 bytes must not overflow or allocate.
    with pytest.raises(InvalidTensor, match="more than the limit of 67,108,864 bytes"):
        tensor_from_proto(_msg(data=b"", shape=(2**62, 2**6)))


def test_too_large_by_data() -> None:
    with pytest.raises(InvalidTensor, match="32 bytes, more than the limit of 16 bytes"):
        tensor_from_proto(_msg(data=b"\0" * 32, shape=(8,)), max_bytes=16)


def test_limit_is_inclusive() -> None:
    assert tensor_from_proto(_msg(), max_bytes=16).shape == (2, 2)
    with pytest.raises(InvalidTensor, match="more than the limit"):
        tensor_from_proto(_msg(), max_bytes=15)


def test_default_limit_is_64_mib() -> None:
    assert MAX_TENSOR_BYTES == 64 * 1024 * 1024


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("bad", "counts"),
    [(float("nan"), "1 NaN, 0 Inf"), (float("inf"), "0 NaN, 1 Inf"), (float("-inf"), "0 NaN, 1 Inf")],
)
def test_non_finite_values_rejected(dtype: torch.dtype, bad: float, counts: str) -> None:
    t = torch.ones(1, 3, 8, dtype=dtype)
    t[0, 1, 5] = bad
    with pytest.raises(InvalidTensor, match=rf"hidden states contains non-finite values \({counts}\)"):
        tensor_from_proto(tensor_to_proto(t), name="hidden states")


def test_wrong_expected_shape_names_both_shapes() -> None:
    msg = tensor_to_proto(torch.zeros(1, 3, 64))
    with pytest.raises(InvalidTensor, match=r"^hidden states has shape \(1, 3, 64\), expected \(1, \*, 576\)$"):
        tensor_from_proto(msg, expected_shape=(1, None, 576), name="hidden states")


def test_wrong_rank() -> None:
    msg = tensor_to_proto(torch.zeros(3, 576))
    with pytest.raises(InvalidTensor, match=r"shape \(3, 576\), expected \(1, \*, 576\)"):
        tensor_from_proto(msg, expected_shape=(1, None, 576))


def test_wrong_expected_dtype() -> None:
    msg = tensor_to_proto(torch.zeros(2, dtype=torch.float16))
    with pytest.raises(InvalidTensor, match=r"^tensor has dtype float16, expected bfloat16$"):
        tensor_from_proto(msg, expected_dtype=torch.bfloat16)


def test_invalid_tensor_is_invalid_input() -> None:
    # Servicers catch InvalidInput to answer INVALID_* rather than INTERNAL.
    with pytest.raises(InvalidInput):
        tensor_from_proto(_msg(dtype="nope"))


# --- errors ------------------------------------------------------------------------------------------

MAPPED: list[tuple[CoopError, int]] = [
    (InvalidTensor("hidden states have shape (1, 3, 64), expected (1, *, 576)"), pb.INVALID_TENSOR),
    (InvalidPositions("start_position 7 but the session is at 5"), pb.INVALID_POSITIONS),
    (UnknownSession("no session 'abc'"), pb.UNKNOWN_SESSION),
    (SessionExists("session 'abc' already open"), pb.SESSION_EXISTS),
    (
        CacheBudgetExceeded(requested_bytes=10_000, free_bytes=10, budget_bytes=1_000),
        pb.CACHE_BUDGET_EXCEEDED,
    ),
    (SessionLimitExceeded("step beyond max_length 128"), pb.SESSION_LIMIT_EXCEEDED),
    (SpanOutOfRange("blocks 0:40 do not fit a 30-block model"), pb.SPAN_MISMATCH),
    (PeerError("node 10.0.0.2:5000 timed out"), pb.PEER_UNAVAILABLE),
    (InvalidInput("max_length must be positive"), pb.INVALID_REQUEST),
]


@pytest.mark.parametrize(("exc", "code"), MAPPED, ids=lambda v: type(v).__name__)
def test_error_roundtrip_keeps_type_and_message(exc: CoopError, code: int) -> None:
    msg = error_to_proto(exc)
    assert msg.code == code
    assert msg.message == str(exc)
    back = error_from_proto(pb.Error.FromString(msg.SerializeToString()))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.args == (str(exc),)


def test_cache_budget_message_survives() -> None:
    back = error_from_proto(error_to_proto(CacheBudgetExceeded(2048, 1024, 4096)))
    assert isinstance(back, CacheBudgetExceeded)
    assert "needs 2,048 bytes but only 1,024 of 4,096 are free" in str(back)


def test_unmapped_coop_errors_are_internal() -> None:
    for exc in (CoopError("boom"), RouteUnavailable([(3, 5)], 10)):
        msg = error_to_proto(exc)
        assert msg.code == pb.INTERNAL
        assert msg.message == str(exc)
        back = error_from_proto(msg)
        assert type(back) is CoopError
        assert str(back) == str(exc)


def test_foreign_exceptions_are_internal_with_type_name() -> None:
    msg = error_to_proto(IndexError("list index out of range"))
    assert msg.code == pb.INTERNAL
    assert msg.message == "IndexError: list index out of range"


def test_subclass_takes_nearest_mapped_ancestor() -> None:
    class OddPositions(InvalidPositions):
        pass

    class OtherInput(InvalidInput):
        pass

    assert error_to_proto(OddPositions("x")).code == pb.INVALID_POSITIONS
    assert error_to_proto(OtherInput("x")).code == pb.INVALID_REQUEST


def test_unauthorized_keeps_its_type() -> None:
    back = error_from_proto(error_to_proto(Unauthorized("not a member of this pool")))
    assert type(back) is Unauthorized and str(back) == "not a member of this pool"


@pytest.mark.parametrize("code", [pb.ERROR_UNSPECIFIED, pb.INTERNAL, 999])
def test_codes_without_class_become_coop_error(code: int) -> None:
    back = error_from_proto(pb.Error(code=cast(pb.ErrorCode, code), message="remote said no"))
    assert type(back) is CoopError
    assert str(back) == "remote said no"


def test_every_code_is_handled() -> None:
    for name, number in pb.ErrorCode.items():
        back = error_from_proto(pb.Error(code=number, message=name))
        assert isinstance(back, CoopError)
        assert str(back) == name
