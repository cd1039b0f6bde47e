"""`pip install .` gives a working Coop: the wheel holds the generated gRPC code, the admin view's
templates and static files and the ledger's migrations, and installed alone it runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import coop
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

PACKAGE_FILES = [
    "coop/wire/generated/coop_pb2.py",
    "coop/wire/generated/coop_pb2_grpc.py",
    "coop/admin/templates/base.html",
    "coop/admin/templates/login.html",
    "coop/admin/static/admin.css",
    "coop/admin/static/admin.js",
    "coop/ledger/migrations/env.py",
    "coop/ledger/migrations/script.py.mako",
    "coop/ledger/migrations/versions/0001_initial_schema.py",
]


def _run(args: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_wheel_holds_every_file_and_runs_installed_alone(tmp_path: Path) -> None:
    # build from a copy of the tracked files, as from a clean checkout, so the checkout gets no build/ or egg-info
    source = tmp_path / "source"
    tracked = _run(["git", "ls-files", "-z"], Path(REPO_ROOT)).split("\0")
    for name in filter(None, tracked):
        if (Path(REPO_ROOT) / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(REPO_ROOT) / name, source / name)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", tmp_path / "dist", "."], source)
    (wheel,) = (tmp_path / "dist").glob("coop-*.whl")
    assert wheel.name.startswith(f"coop-{coop.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [f for f in PACKAGE_FILES if f not in names] == []
    migrations = {n for n in names if n.startswith("coop/ledger/migrations/versions/")}
    assert migrations == {
        f"coop/{p.relative_to(Path(REPO_ROOT) / 'coop')}"
        for p in Path(REPO_ROOT, "coop/ledger/migrations/versions").glob("*.py")
    }

    # a fresh venv that sees the dependencies (this interpreter's site-packages) but not this checkout
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).strip())
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # this checkout out of sight
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel], tmp_path, clean_env)
    where = _run(
        [python, "-c", "import coop.wire.generated.coop_pb2 as pb, coop; print(coop.__file__)"], tmp_path, clean_env
    )
    assert Path(where.strip()).is_relative_to(site)
    assert _run([env_dir / "bin" / "coop", "--version"], tmp_path, clean_env).strip() == f"coop {coop.__version__}"
    # a pool, and its ledger created by the installed migrations
    _run([env_dir / "bin" / "coop", "pool", "init", tmp_path / "pool", "--name", "Wheel Pool"], tmp_path, clean_env)
    balances = _run([env_dir / "bin" / "coop", "ledger", "balances", "--pool", tmp_path / "pool"], tmp_path, clean_env)
    assert "(pool account)" in balances
