"""`python -m tests.adversarial.refusing_node node start …`: Coop's own node, refusing every session.

The attacker (a member with a valid bundle) runs this under as many made-up node ids as it likes:
each announces its span as serving and answers every ping at once, but refuses every session
open as draining, so that requests spend their attempts on it. Each refusal prints `REFUSED` on
stdout, so a test can tell the attack was carried out.
"""

from __future__ import annotations

from coop.errors import NodeDraining
from coop.node.session_streams import SessionStreams
from coop.node.sessions import LiveSession
from coop.pool.identity import Identity
from coop.wire.generated import coop_pb2 as pb

REFUSED = "COOP_FAKE_REFUSED"


def refusing_open(
    streams: SessionStreams, control: pb.SessionControl, opener: Identity | None, host: str
) -> LiveSession:
    print(REFUSED, flush=True)
    raise NodeDraining(f"node {streams.node_id} is draining and opens no new session: route around it")


if __name__ == "__main__":
    from coop.cli import app

    SessionStreams._open = refusing_open  # type: ignore[method-assign]
    app(prog_name="coop")
