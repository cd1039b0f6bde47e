"""The committed generated code must be exactly what scripts/gen_proto.py produces from proto/coop.proto.

Otherwise an edit to the .proto could ship without the Python side changing, and nodes and coordinators
would disagree about the wire format only at runtime.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "coop" / "wire" / "generated"
FILES = ("coop_pb2.py", "coop_pb2.pyi", "coop_pb2_grpc.py")
FIX = "run `python scripts/gen_proto.py` and commit the result"


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in FILES:
        committed = GENERATED / name
        assert committed.exists(), f"{committed} is missing; {FIX}"
        assert committed.read_bytes() == (tmp_path / name).read_bytes(), f"{committed} is stale; {FIX}"


def test_no_unexpected_files_in_generated_package() -> None:
    expected = {"__init__.py", *FILES}
    present = {p.name for p in GENERATED.iterdir() if p.name != "__pycache__"}
    assert present == expected, (
        f"{GENERATED}: unexpected {sorted(present - expected)}, missing {sorted(expected - present)}"
    )


def test_grpc_module_imports_from_package() -> None:
    from coop.wire.generated import coop_pb2, coop_pb2_grpc

    assert coop_pb2_grpc.coop__pb2 is coop_pb2
