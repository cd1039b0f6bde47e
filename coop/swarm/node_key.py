"""A node's identity in the pool: (institution, node id).

A member mints node ids at will and they are unique only within its institution, so everything
the pool keeps about a node — its directory records, measurements, suspicion, refusals, trust
records, receipt polls — is keyed by both. Its `str` ("institution/node_id") is the DHT subkey and
an audit event's subject: institution names never contain "/", and node ids are restricted to
``[A-Za-z0-9._:-]``, so distinct keys always give distinct strings.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol


class NodeKey(NamedTuple):
    institution: str
    node_id: str

    def __str__(self) -> str:
        return f"{self.institution}/{self.node_id}"

    @classmethod
    def parse(cls, subject: str) -> NodeKey:
        institution, _, node_id = subject.rpartition("/")
        return cls(institution, node_id)


class _Identified(Protocol):
    @property
    def institution(self) -> str: ...
    @property
    def node_id(self) -> str: ...


def key_of(node: _Identified) -> NodeKey:
    """The key of a hop, an announcement or a withdrawal."""
    return NodeKey(node.institution, node.node_id)
