"""The demo pool of docker/compose.yaml, built from the local base and run as containers (host network).

Images come from docker/build-images.sh --cpu (a debootstrap base, the host's wheels, no registry); the
pool is brought up under a project name of its own on free ports, asked through the OpenAI client, its
PostgreSQL ledger queried inside the container, and one node container killed mid-generation. It is
always brought down with its volumes, and every failure message carries the containers' logs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from coop.node.client import node_info
from coop.pool.membership import Membership
from coop.wire.generated import coop_pb2 as pb
from tests.http_servers import free_port
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
NODES = ("node-a", "node-b")
BUILD_TIMEOUT_S = 3600.0  # cold: the base from Debian packages and ~90 wheels installed in the image
UP_TIMEOUT_S = 1200.0  # includes the init step preparing the demo model on 2 busy cores
SERVING_TIMEOUT_S = 300.0
BOOKED_TIMEOUT_S = 120.0
STORY = "Write a long story about a brave knight and a dragon."
STORY_TOKENS = 64
KILL_AFTER_CHUNKS = 6
COORDINATOR_BUNDLE = "/pool/admin/coordinators/Demo Coordinator.bundle"

T = TypeVar("T")


@dataclass(frozen=True)
class ComposePool:
    project: str
    env: dict[str, str]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.env['COOP_API_PORT']}/v1"

    def node_endpoint(self, service: str) -> str:
        return f"127.0.0.1:{self.env['COOP_' + service.upper().replace('-', '_') + '_PORT']}"

    def compose(self, *args: str, timeout_s: float = 120.0) -> str:
        command = ["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}\n{self.logs()}")
        return done.stdout

    def logs(self) -> str:
        command = ["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), "logs", "--no-color", "--tail", "60"]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120, check=False)
        return f"--- container logs ---\n{done.stdout}{done.stderr}"

    def wait_for(self, what: str, check: Callable[[], T | None], timeout_s: float) -> T:
        try:
            return wait_for(what, check, timeout_s, every_s=1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def read(self, service: str, path: str) -> str:
        return self.compose("exec", "-T", service, "cat", path)

    def sql(self, query: str) -> str:
        psql = ["psql", "-h", "127.0.0.1", "-p", self.env["COOP_POSTGRES_PORT"], "-U", "coop", "-tAc", query]
        return self.compose("exec", "-T", "-e", f"PGPASSWORD={self.env['COOP_POSTGRES_PASSWORD']}", "postgres", *psql)


@pytest.fixture(scope="module")
def compose_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposePool]:
    build = subprocess.run(
        [str(REPO / "docker" / "build-images.sh"), "--cpu"],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert build.returncode == 0, f"docker/build-images.sh --cpu failed:\n{build.stdout}\n{build.stderr}"
    ports = {
        f"COOP_{name}_PORT": str(free_port())
        for name in ("POSTGRES", "DHT", "NODE_A", "NODE_B", "NODE_A_METRICS", "NODE_B_METRICS", "API")
    }
    # no spot checks: a shadow session on the other node would make "the node holding the session" ambiguous
    checks_off = {"COOP_COORDINATOR_SPOT_CHECK_RATE": "0", "COOP_COORDINATOR_SPOT_CHECK_NEW_NODE_RATE": "0"}
    env = {**os.environ, **ports, **checks_off, "COOP_POSTGRES_PASSWORD": uuid.uuid4().hex}
    pool = ComposePool(f"cooptest{uuid.uuid4().hex[:8]}", env)
    try:
        pool.compose("up", "-d", timeout_s=UP_TIMEOUT_S)
        yield pool
    finally:
        pool.compose("down", "--volumes", "--timeout", "20", timeout_s=300)


@pytest.fixture(scope="module")
def client(compose_pool: ComposePool) -> OpenAI:
    key = compose_pool.read("coordinator", "/pool/demo-api.key").strip()
    # retries: a request may meet a keep-alive connection the server is closing (uvicorn drops idle ones
    # after 5 s); a response that has started is never retried, so a failover stays visible
    client = OpenAI(base_url=compose_pool.api_url, api_key=key, timeout=120, max_retries=2)

    def serving() -> bool:
        try:
            client.chat.completions.create(
                model="smollm2-demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0
            )
        except Exception:  # not up yet: connection refused, or no route while nodes announce
            return False
        return True

    compose_pool.wait_for("the coordinator to answer through a route of nodes", serving, SERVING_TIMEOUT_S)
    return client


def test_answers_through_the_openai_client(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2-demo",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Paris" in (reply.choices[0].message.content or "")


def test_receipts_are_booked_in_the_postgres_ledger(compose_pool: ComposePool, client: OpenAI) -> None:
    def booked() -> list[tuple[str, str]]:
        rows = compose_pool.sql("SELECT provider, consumer FROM receipts").splitlines()
        return [tuple(row.split("|")) for row in rows if row]  # type: ignore[misc]

    receipts = compose_pool.wait_for("receipts booked in the PostgreSQL ledger", booked, BOOKED_TIMEOUT_S)
    assert {provider for provider, _ in receipts} <= {"Universidad A", "Universidad B"}
    assert {consumer for _, consumer in receipts} == {"Universidad B"}  # the demo API key's institution
    unbalanced = compose_pool.sql(
        "SELECT receipt_id FROM postings WHERE receipt_id IS NOT NULL"
        " GROUP BY receipt_id HAVING sum(amount_hi::numeric * 1000000000 + amount_lo) <> 0"
    )
    assert unbalanced.strip() == "", f"receipts whose postings do not sum to zero: {unbalanced}"


def test_metrics_are_served_by_every_container(compose_pool: ComposePool, client: OpenAI) -> None:
    """Prometheus scrapes the nodes' --metrics-port (from COOP_NODE_METRICS_PORT) and the coordinator."""
    served = {}
    for name in ("NODE_A_METRICS", "NODE_B_METRICS", "API"):
        with urllib.request.urlopen(
            f"http://127.0.0.1:{compose_pool.env[f'COOP_{name}_PORT']}/metrics", timeout=30
        ) as r:
            served[name] = {family.name: family for family in text_string_to_metric_families(r.read().decode())}
    steps = sum(served[n]["coop_node_steps"].samples[0].value for n in ("NODE_A_METRICS", "NODE_B_METRICS"))
    assert steps > 0, "the nodes ran the earlier questions' steps"
    assert "coop_coordinator_time_to_first_token_seconds" in served["API"]


def _stream_story(client: OpenAI, on_chunk: Callable[[int], None]) -> dict[str, object]:
    """Stream a long greedy answer; call on_chunk(n) after the n-th content chunk; return the coop extras."""
    stream = client.chat.completions.create(
        model="smollm2-demo",
        messages=[{"role": "user", "content": STORY}],
        max_tokens=STORY_TOKENS,
        temperature=0,
        stream=True,
    )
    extras: dict[str, object] = {}
    count = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            count += 1
            on_chunk(count)
        extras = (chunk.model_extra or {}).get("coop") or extras
    assert extras, "the last chunk carries no coop extras (token ids, route)"
    return extras


def test_node_container_killed_mid_generation_gives_the_same_tokens(
    compose_pool: ComposePool, client: OpenAI, tmp_path: Path
) -> None:
    bundle = tmp_path / "coordinator.bundle"
    bundle.write_text(compose_pool.read("coordinator", COORDINATOR_BUNDLE))
    security = Membership.load(bundle).channel_security()
    institutions = {"node-a": "Universidad A", "node-b": "Universidad B"}

    def info(node: str) -> pb.NodeInfo:
        return node_info(compose_pool.node_endpoint(node), security, institution=institutions[node], node_id=node)

    def steps_run() -> dict[str, int]:
        return {node: info(node).counters.steps_run for node in NODES}

    uninterrupted = _stream_story(client, lambda _: None)

    # The streams of this test are the pool's only traffic (spot checks are off), so the nodes that run
    # steps once the next stream starts are the ones on its route; a node that merely still holds a
    # session (one closing, say) runs none.
    def no_step_in_flight() -> bool:
        return not any(info(node).steps_in_flight for node in NODES)

    compose_pool.wait_for("the first stream's steps to finish", no_step_in_flight, SERVING_TIMEOUT_S)
    before = steps_run()
    killed: list[str] = []

    def kill_a_node_of_the_route(count: int) -> None:
        if count == KILL_AFTER_CHUNKS and not killed:
            on_route = [node for node, steps in steps_run().items() if steps > before[node]]
            assert on_route, "no node ran this stream's steps"
            killed.append(on_route[0])
            compose_pool.compose("kill", on_route[0])

    interrupted = _stream_story(client, kill_a_node_of_the_route)
    assert killed, "the generation ended before a node could be killed"
    assert interrupted["token_ids"] == uninterrupted["token_ids"]
    route = interrupted["route"]
    assert isinstance(route, list)
    assert killed[0] not in {hop["node_id"] for hop in route}
    assert route[-1]["failovers"] >= 1


def _inspect(ids: list[str], template: str) -> list[str]:
    done = subprocess.run(["docker", "inspect", "-f", template, *ids], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def test_sigterm_stops_every_container_cleanly(compose_pool: ComposePool) -> None:
    """Last: `docker-compose stop` sends SIGTERM; each process withdraws, drains and exits 0 within the grace."""
    ids = compose_pool.compose("ps", "-q").split()
    running = [line.split()[0] for line in _inspect(ids, "{{.Id}} {{.State.Running}}") if line.endswith(" true")]
    assert len(running) >= 4, "coordinator, a node, the DHT peer and PostgreSQL should still run"
    compose_pool.compose("stop", "--timeout", "20", timeout_s=300)
    unclean = [line for line in _inspect(running, "{{.Name}} {{.State.ExitCode}}") if not line.endswith(" 0")]
    assert unclean == [], f"not stopped cleanly by SIGTERM: {unclean}\n{compose_pool.logs()}"
