"""Per-key revocation in the pool directory, and the admin view's small live-state helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

import coop.admin
from coop.admin import CounterRate, NodePresence, TokenRateMeter
from coop.errors import InvalidInput
from coop.pool.api_keys import ApiKeyStore, api_key_digest
from coop.pool.registry import API_KEYS_FILE, add_member, create_api_key, create_pool, revoke_api_key
from coop.swarm.node_key import NodeKey


def test_revoking_one_key_leaves_the_institution_s_other_keys_alone(tmp_path: Path) -> None:
    pool = create_pool(tmp_path / "pool", "keys")
    add_member(pool.directory, "Lab A")
    first, second = create_api_key(pool.directory, "Lab A"), create_api_key(pool.directory, "Lab A")
    record = revoke_api_key(pool.directory, api_key_digest(first))
    assert record.institution == "Lab A" and record.revoked is False, "the record as it was"
    store = ApiKeyStore.load(pool.directory / API_KEYS_FILE)
    assert store.resolve(first) is None and store.resolve(second) == "Lab A"
    assert revoke_api_key(pool.directory, api_key_digest(first)).revoked is True, "idempotent"
    assert (pool.directory / API_KEYS_FILE).stat().st_mode & 0o777 == 0o600
    with pytest.raises(InvalidInput, match="no API key"):
        revoke_api_key(pool.directory, "0" * 64)


def test_token_rate_meter_keeps_only_its_window() -> None:
    now = [100.0]
    meter = TokenRateMeter(window_s=10, clock=lambda: now[0])
    meter.add(5)
    meter.add(7, at_s=95.0)
    now[0] = 106.0
    assert meter.samples() == [(100.0, 5)]
    now[0] = 111.0
    assert meter.samples() == []


def test_node_presence_restarts_uptime_after_a_gap() -> None:
    now = [0.0]
    presence = NodePresence(clock=lambda: now[0])
    a, b = NodeKey("alpha", "gpu-0"), NodeKey("beta", "gpu-0")  # one id, two members: two nodes
    assert presence.observe([a, b]) == {a: 0.0, b: 0.0}
    now[0] = 30.0
    assert presence.observe([a]) == {a: 0.0}
    now[0] = 60.0
    assert presence.observe([a, b]) == {a: 0.0, b: 60.0}


def test_public_names() -> None:
    assert list(coop.admin.__all__) == sorted(coop.admin.__all__)
    for name in coop.admin.__all__:
        assert hasattr(coop.admin, name), name


def test_counter_rate_spreads_what_a_counter_gained_over_the_time_since_the_last_read() -> None:
    now, served = [1000.0], [500]
    rate = CounterRate(lambda: served[0], window_s=100, step_s=10, clock=lambda: now[0])
    assert rate.samples() == [], "the first read only sets the baseline"
    now[0], served[0] = 1040.0, 900
    samples = rate.samples()
    assert [t for t, _ in samples] == [1005.0, 1015.0, 1025.0, 1035.0]
    assert sum(v for _, v in samples) == pytest.approx(400)
    now[0], served[0] = 1300.0, 1900  # a long quiet read: only the window's share is kept, at the mean rate
    samples = rate.samples()
    assert sum(v for _, v in samples) == pytest.approx(1000 * 100 / 260)
    assert min(t for t, _ in samples) >= 1200
