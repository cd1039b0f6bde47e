"""Graceful drain and owner reclaim: the schedule, the state machine, routing, and a real node refusing opens."""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from coop.errors import InvalidInput, RouteUnavailable, Unauthorized
from coop.model.engine import SpanEngine
from coop.node.client import node_control
from coop.node.drain import ServingState, state_of
from coop.node.memory_yield import MemoryYield, follow_memory
from coop.node.serving_hours import parse_serving_hours, within
from coop.swarm.announcement import (
    DRAINING,
    PAUSED,
    SERVING,
    AnnouncementVerifier,
    NodeAnnouncement,
    announcement_payload,
    stamp_announcement,
)
from coop.swarm.routing import choose_route
from coop.wire.generated import coop_pb2 as pb
from coop.wire.generated import coop_pb2_grpc
from tests.node_harness import NodeInThread, channel, open_session, refused_open, step
from tests.pools import make_member_pool

NINE_TO_FIVE = parse_serving_hours("09:00-17:00")
OVERNIGHT = parse_serving_hours("22:00-06:30")


@pytest.mark.parametrize(
    ("hours", "now", "serving"),
    [
        (NINE_TO_FIVE, dt.time(9, 0), True),
        (NINE_TO_FIVE, dt.time(16, 59), True),
        (NINE_TO_FIVE, dt.time(17, 0), False),
        (NINE_TO_FIVE, dt.time(8, 59), False),
        (OVERNIGHT, dt.time(23, 0), True),
        (OVERNIGHT, dt.time(3, 0), True),
        (OVERNIGHT, dt.time(6, 30), False),
        (OVERNIGHT, dt.time(12, 0), False),
    ],
)
def test_serving_hours_window(hours: object, now: dt.time, serving: bool) -> None:
    assert within(hours, now) is serving  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["9-17", "09:00-25:00", "09:00-09:00", "09:00", "morning"])
def test_bad_serving_hours_say_the_format(text: str) -> None:
    with pytest.raises(InvalidInput, match="serving hours"):
        parse_serving_hours(text)


def test_draining_wins_and_resume_lifts_only_the_owners_pause() -> None:
    assert state_of(draining=False, paused=False, outside_hours=False) == SERVING
    assert state_of(draining=False, paused=True, outside_hours=False) == PAUSED
    assert state_of(draining=False, paused=False, outside_hours=True) == PAUSED
    assert state_of(draining=True, paused=True, outside_hours=True) == DRAINING

    serving = ServingState(drain_deadline_s=60, hours=NINE_TO_FIVE)
    heard: list[str] = []
    serving.listeners.append(heard.append)
    serving.apply_hours(dt.time(8, 0))
    serving.pause()
    serving.resume()  # still outside the serving hours
    assert serving.state == PAUSED and not serving.accepting
    serving.apply_hours(dt.time(10, 0))
    assert serving.accepting
    serving.drain()
    serving.resume()
    assert serving.state == DRAINING
    assert heard == [PAUSED, SERVING, DRAINING]  # one call per change, none for no-ops


def test_a_drain_waits_for_sessions_up_to_its_deadline() -> None:
    async def drain(deadline_s: float, open_sessions: list[int]) -> float:
        serving = ServingState(drain_deadline_s=deadline_s)
        loop = asyncio.get_running_loop()
        serving.drain()
        started = loop.time()
        loop.call_later(0.3, open_sessions.clear)  # the last session moves away
        await serving.wait_drained(lambda: len(open_sessions))
        return loop.time() - started

    assert asyncio.run(drain(60.0, [1])) >= 0.3  # returned once the session moved, not before
    assert asyncio.run(drain(0.0, [1, 2])) < 0.3  # the deadline passed: returned with sessions open


GIB = 2**30


def test_memory_yield_pauses_at_once_and_resumes_only_after_plenty_for_a_while() -> None:
    watch = MemoryYield(threshold_bytes=4 * GIB, resume_after_s=30)
    readings = [  # (seconds, GiB available to local processes) -> yielding
        (0, 10, False),
        (1, 3, True),  # a local job took the memory
        (2, 5, True),  # above the threshold but under twice it: stays out of routes
        (3, 9, True),  # plenty, but not for long yet
        (20, 3, True),  # the job allocates again: the wait starts over
        (21, 9, True),
        (50, 9, False),  # 29 s of plenty since 21 would not do; 30 s at 51 ...
    ]
    seen = [watch.update(gib * GIB, t) for t, gib, _ in readings]
    assert seen == [False, True, True, True, True, True, True]
    assert watch.update(9 * GIB, 51) is False  # ... does
    assert watch.update(4 * GIB, 52) is False  # at the threshold itself: serving


def test_a_yielding_node_pauses_and_releases_its_cache_only_once_its_sessions_are_gone() -> None:
    """The loop a GPU node runs, driven by a scripted device (no GPU here): pause, wait, release, resume."""
    available = iter([10, 1, 1, 1, 9, 9, 9] + [9] * 10)
    open_sessions = [2]
    released: list[int] = []
    serving = ServingState(drain_deadline_s=60)
    states: list[str] = []
    serving.listeners.append(states.append)
    now = iter(range(100))

    def reading() -> int:
        value = next(available)
        if len(states) == 1 and open_sessions:
            open_sessions.pop()  # the coordinators move the sessions away, one per poll
        return value * GIB

    async def run() -> None:
        watch = MemoryYield(threshold_bytes=4 * GIB, resume_after_s=2)
        follow = asyncio.create_task(
            follow_memory(
                serving,
                watch,
                reading,
                lambda: len(open_sessions),
                lambda: released.append(len(open_sessions)),
                poll_s=0,
                clock=lambda: float(next(now)),
            )
        )
        for _ in range(200):
            await asyncio.sleep(0)
            if states == [PAUSED, SERVING]:
                break
        follow.cancel()

    asyncio.run(run())
    assert states == [PAUSED, SERVING]  # never flapped
    assert released == [0]  # released once, after the last session left


def test_a_move_drains_without_exiting_and_serves_again() -> None:
    serving = ServingState(drain_deadline_s=0.0)
    heard: list[str] = []
    serving.listeners.append(heard.append)
    serving.begin_move()
    assert serving.state == DRAINING and not serving.exiting
    assert asyncio.run(serving.wait_sessions_moved(lambda: 2, "before moving")) == 2  # deadline 0: 2 left
    serving.pause()  # the owner paused the node during its move: it stays paused after it
    serving.end_move()
    assert heard == [DRAINING, PAUSED]
    serving.resume()
    assert serving.accepting


def _announced(node_id: str, start: int, end: int, state: str = SERVING) -> NodeAnnouncement:
    return NodeAnnouncement(
        node_id=node_id,
        pool_id="default",
        model_hash="m",
        start=start,
        end=end,
        endpoint="127.0.0.1:1",
        institution="local",
        throughput_tps=10.0,
        free_cache_bytes=1,
        state=state,  # type: ignore[arg-type]
        announced_at=1.0,
        expires_at=2.0,
    )


def test_routes_skip_paused_and_draining_nodes() -> None:
    fast_but_leaving = [_announced("leaving", 0, 4, DRAINING), _announced("paused", 0, 4, PAUSED)]
    staying = _announced("staying", 0, 4)
    assert [hop.node_id for hop in choose_route([*fast_but_leaving, staying], 4)] == ["staying"]
    with pytest.raises(RouteUnavailable):
        choose_route(fast_but_leaving, 4)
    assert NodeAnnouncement.from_wire({**staying.to_wire(), "state": PAUSED}).state == PAUSED
    with pytest.raises(InvalidInput):
        NodeAnnouncement.from_wire({**staying.to_wire(), "state": "asleep"})


def test_the_state_is_signed_and_a_serving_record_signs_as_before_it_existed(tmp_path: Path) -> None:
    members = make_member_pool(tmp_path, members=("alpha",))
    alpha = members["alpha"]
    fields = _announced("node-a", 0, 4).to_wire()
    fields = {k: v for k, v in fields.items() if k not in ("announced_at", "expires_at", "signature", "certificate")}
    fields.update(pool_id=members.pool_id, institution="alpha")
    verify = AnnouncementVerifier(alpha.ca_cert_pem, members.pool_id)
    credentials = alpha.credentials("node-a")

    paused = stamp_announcement({**fields, "state": PAUSED}, now=time.time(), ttl_s=9, bundle=credentials)
    assert verify(paused)
    assert not verify(paused.model_copy(update={"state": SERVING}))  # only the node can put itself back in routes
    serving = stamp_announcement({**fields, "state": SERVING}, now=time.time(), ttl_s=9, bundle=credentials)
    as_before = NodeAnnouncement.from_wire({k: v for k, v in serving.to_wire().items() if k != "state"})
    assert verify(serving) and verify(as_before)
    assert b"state" not in announcement_payload(serving)


@pytest.fixture(scope="module")
def node(tiny_llama_dir: str) -> Iterator[NodeInThread]:
    with tempfile.TemporaryDirectory() as private:
        socket = Path(private) / "node.sock"
        with NodeInThread(SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu"), control_socket=socket) as node:
            yield node


def test_a_paused_node_refuses_opens_tells_open_sessions_and_serves_again_on_resume(node: NodeInThread) -> None:
    assert node.control_socket is not None and node.service is not None
    socket = f"unix:{node.control_socket}"
    with channel(node) as ch:
        stub = coop_pb2_grpc.NodeStub(ch)
        controls, events = open_session(stub, "before-pause")
        reply = node_control(socket, pb.ControlRequest.PAUSE)
        assert (reply.state, reply.active_sessions) == (PAUSED, 1)
        told = next(events)
        assert told.WhichOneof("kind") == "draining" and told.draining.session_id == "before-pause"
        # the open session still runs its steps until its coordinator moves it
        hidden = torch.zeros(1, 3, node.engine.hidden_size)
        assert not stub.Forward(step("before-pause", 1, hidden, 0), timeout=30).HasField("error")
        assert next(events).WhichOneof("kind") == "result"
        refused = refused_open(stub, "during-pause", 64)
        assert refused.code == pb.NODE_DRAINING and "paused" in refused.message
        assert node.info().state == PAUSED
        controls.put(None)

        assert node_control(socket, pb.ControlRequest.RESUME).state == SERVING
        controls, events = open_session(stub, "after-resume")
        controls.put(None)


def test_without_a_bundle_control_only_comes_through_the_socket(node: NodeInThread) -> None:
    with pytest.raises(Unauthorized, match="control socket"):
        node_control(node.endpoint, pb.ControlRequest.DRAIN)
    assert node.info().state == SERVING
    with pytest.raises(grpc.RpcError) as refused, channel(node) as ch:
        coop_pb2_grpc.NodeStub(ch).Control(pb.ControlRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
