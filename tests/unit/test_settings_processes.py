"""A real node and a real coordinator, started through `coop … start`, run with a setting from each
source: one from the environment, one from the --config file, one by flag over both."""

from __future__ import annotations

from pathlib import Path

import httpx

from coop.launcher import start
from coop.node.client import node_info
from tests.http_servers import free_port


def test_a_running_node_uses_each_source(tiny_llama_dir: str, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("max_sessions_per_peer = 7\nidle_timeout_s = 100.0\ncache_budget_mb = 64\n")
    env = {"COOP_NODE_CACHE_BUDGET_MB": "300", "COOP_NODE_IDLE_TIMEOUT_S": "77"}
    args = ["node", "start", "--model", tiny_llama_dir, "--blocks", "0:6", "--device", "cpu", "--config", str(config)]
    node = start("settings-node", [*args, "--idle-timeout-s", "42"], "COOP_NODE_READY", env=env)
    try:
        limits = node_info(node.ready["endpoint"]).limits
    finally:
        node.stop()
    assert limits.cache_budget_bytes == 300 << 20  # env over file
    assert limits.sessions_per_peer == 7  # file
    assert limits.idle_timeout_s == 42  # flag over env and file
    (logged,) = (line for line in node.lines if "settings not at their default" in line)
    assert "cache_budget_mb = 300  # env COOP_NODE_CACHE_BUDGET_MB" in logged
    assert f"max_sessions_per_peer = 7  # file {config}" in logged


def test_a_running_coordinator_uses_each_source(tiny_llama_dir: str, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "coordinator.toml"
    config.write_text(f"port = {port}\nmax_request_bytes = 9000\n")
    env = {"COOP_COORDINATOR_METRICS_TOKEN": "t0ken", "COOP_COORDINATOR_MAX_REQUEST_BYTES": "8000"}
    args = ["coordinator", "start", "--model", tiny_llama_dir, "--device", "cpu", "--config", str(config)]
    args += ["--max-request-bytes", "1000"]
    coordinator = start("settings-coordinator", args, "COOP_COORDINATOR_READY", env=env)
    try:
        url = coordinator.ready["url"]
        anonymous = httpx.get(f"{url}/metrics", timeout=10)
        scraper = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer t0ken"}, timeout=10)
        body = b'{"model": "m", "prompt": "' + b"x" * 2000 + b'"}'
        big = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    finally:
        coordinator.stop()
    assert url == f"http://127.0.0.1:{port}"  # file
    assert (anonymous.status_code, scraper.status_code) == (401, 200)  # env
    assert big.status_code == 413  # flag over env and file
