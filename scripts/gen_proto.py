"""Regenerate coop/wire/generated/ from proto/coop.proto.

The generated modules are committed so that installing Coop never needs protoc; this script is the only
way they should change, and tests/unit/test_proto_current.py fails when they differ from its output.

    .venv/bin/python scripts/gen_proto.py              # rewrite coop/wire/generated/
    .venv/bin/python scripts/gen_proto.py --out DIR    # write into DIR instead (used by the test)
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_FILE = ROOT / "proto" / "coop.proto"
DEFAULT_OUT = ROOT / "coop" / "wire" / "generated"
GENERATED_FILES = ("coop_pb2.py", "coop_pb2.pyi", "coop_pb2_grpc.py")

# protoc writes a top-level import, which only works with the output directory on sys.path; the package
# lives at coop.wire.generated, so the import is rewritten to an absolute one.
_GRPC_IMPORT = "import coop_pb2 as coop__pb2\n"
_GRPC_IMPORT_FIXED = "from coop.wire.generated import coop_pb2 as coop__pb2\n"


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules into ``out_dir`` and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_FILE.parent}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO_FILE}")

    grpc_file = out_dir / "coop_pb2_grpc.py"
    text = grpc_file.read_text(encoding="utf-8")
    if text.count(_GRPC_IMPORT) != 1:
        # A grpcio-tools upgrade changed what it emits; fail loudly rather than ship a broken import.
        raise SystemExit(f"expected exactly one {_GRPC_IMPORT.strip()!r} in {grpc_file}")
    grpc_file.write_text(text.replace(_GRPC_IMPORT, _GRPC_IMPORT_FIXED), encoding="utf-8")
    return [out_dir / name for name in GENERATED_FILES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
