"""Attacks on a pool, carried out for real: each module is one attacker and what must stop them."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import demo_client, reference

__all__ = ["demo_client", "reference"]

pytestmark = pytest.mark.slow
