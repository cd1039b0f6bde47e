"""`coop demo --once`: the README's main command answers, shows the route and the ledger, cleans up after itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_once(demo_model_dir: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    done = subprocess.run(
        [sys.executable, "-m", "coop.cli", "demo", "--once", "--port", "0", "--model-dir", demo_model_dir],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "Paris" in out
    for name, blocks in [("demo-node-1", "0:10"), ("demo-node-2", "10:20"), ("demo-node-3", "20:30")]:
        assert name in out and blocks in out
    assert "OpenAI-compatible API: http://127.0.0.1:" in out
    assert "3 signed receipts booked in the ledger" in out
    for institution in ("Demo University A", "Demo University B", "Demo Lab C"):
        assert institution in out
    assert "admin web view:        http://127.0.0.1:" in out
    leftovers = subprocess.run(
        ["pgrep", "-f", f"coop.cli node start --model {demo_model_dir}"], capture_output=True, text=True
    )
    assert leftovers.stdout == ""
