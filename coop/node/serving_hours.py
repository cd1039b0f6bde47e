"""Serving hours: the local times of day a node serves the pool; outside them it is paused.

`--serving-hours 09:00-17:00` serves from 9 am to 5 pm local time; `22:00-06:00` serves overnight
(the window wraps past midnight). Pure functions, so the schedule is tested without a clock.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from coop.errors import InvalidInput

_WINDOW = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


@dataclass(frozen=True)
class ServingHours:
    start: dt.time
    end: dt.time

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def parse_serving_hours(text: str) -> ServingHours:
    """'HH:MM-HH:MM' (local time) -> ServingHours; InvalidInput saying what is wrong otherwise."""
    match = _WINDOW.match(text.strip())
    if match is None:
        raise InvalidInput(f"serving hours must look like 09:00-17:00 (local time), got {text!r}")
    h1, m1, h2, m2 = (int(part) for part in match.groups())
    try:
        hours = ServingHours(dt.time(h1, m1), dt.time(h2, m2))
    except ValueError as exc:
        raise InvalidInput(f"serving hours {text!r}: {exc}") from exc
    if hours.start == hours.end:
        raise InvalidInput(f"serving hours {text!r} are empty: start and end are the same time")
    return hours


def within(hours: ServingHours, now: dt.time) -> bool:
    """Whether `now` (local time of day) falls in [start, end), wrapping past midnight."""
    if hours.start < hours.end:
        return hours.start <= now < hours.end
    return now >= hours.start or now < hours.end
