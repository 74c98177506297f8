"""Billing cycles: monthly, in UTC, anchored on the organization's anchor day.

A cycle starts at 00:00:00 UTC on the anchor day of a month and ends (exclusive) at
the same instant a month later. An anchor of 29, 30 or 31 falls on the last day of
a shorter month (anchor 31: Jan 31, Feb 28/29, Mar 31, ...), so every cycle is
contiguous with the next and none is skipped.
"""
from __future__ import annotations

import calendar
from datetime import datetime, timezone


def _anchor_in(year: int, month: int, anchor_day: int) -> datetime:
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    return datetime(year, month, day, tzinfo=timezone.utc)


def _add_months(year: int, month: int, months: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + months
    return index // 12, index % 12 + 1


def cycle_containing(at: datetime, anchor_day: int) -> tuple[datetime, datetime]:
    """The [start, end) of the cycle that holds the instant `at`."""
    if not 1 <= anchor_day <= 31:
        raise ValueError("anchor day must be between 1 and 31")
    at = at.astimezone(timezone.utc)
    start = _anchor_in(at.year, at.month, anchor_day)
    if start > at:
        year, month = _add_months(at.year, at.month, -1)
        start = _anchor_in(year, month, anchor_day)
    return start, next_cycle_start(start, anchor_day)


def next_cycle_start(start: datetime, anchor_day: int) -> datetime:
    """The start of the cycle after the one beginning at `start`."""
    year, month = _add_months(start.year, start.month, 1)
    return _anchor_in(year, month, anchor_day)
