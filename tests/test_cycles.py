"""Billing cycles: monthly, in UTC, anchored on the organization's anchor day."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal.billing.cycles import cycle_containing


def utc(*parts) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("at", "anchor", "start", "end"),
    [
        (utc(2026, 11, 25, 13), 1, utc(2026, 11, 1), utc(2026, 12, 1)),
        (utc(2026, 11, 14, 23, 59), 15, utc(2026, 10, 15), utc(2026, 11, 15)),
        (utc(2026, 11, 15), 15, utc(2026, 11, 15), utc(2026, 12, 15)),
        (utc(2027, 2, 10), 31, utc(2027, 1, 31), utc(2027, 2, 28)),
        (utc(2027, 2, 28), 31, utc(2027, 2, 28), utc(2027, 3, 31)),
        (utc(2028, 2, 29, 12), 30, utc(2028, 2, 29), utc(2028, 3, 30)),
        (utc(2026, 12, 31, 23), 1, utc(2026, 12, 1), utc(2027, 1, 1)),
    ],
)
def test_cycle_containing(at, anchor, start, end):
    assert cycle_containing(at, anchor) == (start, end)


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(timezone.utc)),
       st.integers(1, 31))
def test_cycles_hold_their_instant_and_tile_time(at, anchor):
    start, end = cycle_containing(at, anchor)
    assert start <= at < end
    assert 28 <= (end - start).days <= 31
    assert cycle_containing(end, anchor)[0] == end  # the next cycle starts where this one ends


def test_anchor_out_of_range_is_refused():
    with pytest.raises(ValueError):
        cycle_containing(utc(2026, 1, 1), 32)
