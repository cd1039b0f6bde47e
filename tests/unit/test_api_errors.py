"""One exception tree, and an HTTP answer of its own for every class of it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import coop
import coop.errors
from coop.coordinator.http.api_errors import ERROR_TABLE, error_response
from coop.errors import _RETRYABLE_CODES, ApiError, CoopError, InvalidTensor, PeerError, RequestError

COOP_DIR = Path(coop.__file__).parent


def _tree(root: type[CoopError] = CoopError) -> list[type[CoopError]]:
    """`root` and every class below it, depth first."""
    classes = [root]
    for sub in root.__subclasses__():
        classes.extend(_tree(sub))
    return classes


TREE = [cls for cls in _tree() if cls.__module__ == "coop.errors"]


def _instance(cls: type[CoopError]) -> CoopError:
    """An instance with a plain message, whatever arguments the class's __init__ takes."""
    message = f"a {cls.__name__}"
    try:
        return cls(message)
    except TypeError:  # structured arguments (CacheBudgetExceeded, ApiError): as coop.wire.errors rebuilds them
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)
        return exc


def test_every_error_class_is_in_coop_errors() -> None:
    """No CoopError subclass is defined outside coop/errors.py (read from the source, not imports)."""
    names = {cls.__name__ for cls in TREE} | {"Exception"}
    strays = []
    for path in sorted(COOP_DIR.rglob("*.py")):
        if path == COOP_DIR / "errors.py" or "generated" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if bases & (names - {"Exception"}):
                    strays.append(f"{path.relative_to(COOP_DIR.parent)}: {node.name}")
    assert not strays, f"error classes outside coop/errors.py: {strays}"
    assert [cls for cls in _tree() if cls.__module__.startswith("coop.") and cls not in TREE] == []


def test_the_docstring_draws_every_class() -> None:
    doc = coop.errors.__doc__ or ""
    missing = [cls.__name__ for cls in TREE if f" {cls.__name__}" not in doc]
    assert not missing, f"coop/errors.py's docstring does not draw {missing}"


@pytest.mark.parametrize("cls", TREE, ids=lambda cls: cls.__name__)
def test_every_error_class_has_its_own_row(cls: type[CoopError]) -> None:
    """A new error class without a row fails here, instead of falling through to its parent's row."""
    assert cls in ERROR_TABLE, f"{cls.__name__} has no row in coop.coordinator.http.api_errors.ERROR_TABLE"
    status, kind, code = ERROR_TABLE[cls]
    answer_status, body = error_response(_instance(cls))
    if cls is RequestError:  # each instance carries its own status and code
        assert (answer_status, body.error.type) == (400, "invalid_request_error")
        return
    assert (answer_status, body.error.type, body.error.code) == (status, kind, code)
    assert body.error.message == f"a {cls.__name__}"
    if cls is not CoopError:
        assert code != "internal_error", f"{cls.__name__} maps to the catch-all"


def test_statuses_are_what_clients_can_act_on() -> None:
    rows = {cls.__name__: ERROR_TABLE[cls][:2] for cls in TREE}
    assert rows["Unauthorized"][0] == 401
    assert rows["CreditExhausted"] == (402, "insufficient_quota")
    assert rows["PeerError"] == (502, "server_error")
    assert rows["InvalidTensor"][0] == 502  # the HTTP client sends no tensors: a node's fault
    assert rows["InvalidPositions"][0] == 502
    for name in ("RouteUnavailable", "CacheBudgetExceeded", "SessionLimitExceeded"):
        assert rows[name] == (503, "service_unavailable_error"), name
    for name in ("ModelStoreError", "ModelNotFound", "LedgerError"):
        assert rows[name] == (500, "server_error"), name


def test_request_error_answers_with_its_own_status_and_code() -> None:
    status, body = error_response(RequestError("no such key", status=401, code="invalid_api_key"))
    assert (status, body.error.type, body.error.code) == (401, "invalid_request_error", "invalid_api_key")
    status, body = error_response(RequestError("too long", param="max_tokens", code="context_length_exceeded"))
    assert (status, body.error.param) == (400, "max_tokens")


def test_an_unknown_exception_is_a_500_that_hides_its_message() -> None:
    status, body = error_response(KeyError("secret internals"))
    assert (status, body.error.code) == (500, "internal_error")
    assert "secret" not in body.error.message and "KeyError" in body.error.message


def test_a_peers_error_is_502_and_keeps_its_remote_type() -> None:
    error = PeerError("node x refused the step (InvalidTensor): hidden states contain NaN", remote_type="InvalidTensor")
    status, body = error_response(error)
    assert (status, body.error.code) == (502, "peer_error") and "InvalidTensor" in body.error.message
    assert error.remote_type == "InvalidTensor"
    assert PeerError("no answer").remote_type is None
    assert error_response(InvalidTensor("from a node"))[0] == 502


def test_retryable_codes_follow_the_table() -> None:
    """Errors sent mid-stream arrive after a 200: the SDK knows them retryable by their code alone."""
    for cls, (status, _kind, code) in ERROR_TABLE.items():
        mid_stream = ApiError("x", status=200, code=code)
        assert mid_stream.retryable == (status in (502, 503, 504)), f"{cls.__name__}: {code}"
    assert {"connection_error", "timeout"} <= _RETRYABLE_CODES
