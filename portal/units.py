"""Quantities and periods as a person reads them.

Usage is metered in the unit the platform counts (machine-seconds, GB-hours); a
customer thinks in hours, GB-months and days. `readable(quantity, unit)` gives both:
the figure in the person's unit, rounded for reading, and the exact figure as
metered (for a hover title). Billing never uses the rounded figure: amounts come
from the exact quantity through `portal.money`.

A month here is 730 hours (365 x 24 / 12), the convention cloud providers bill
GB-months by.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

HOURS_PER_MONTH = Decimal(730)
SECONDS_PER_HOUR = Decimal(3600)

# metered unit -> (unit people read, how many metered units make one of it)
_CONVERSIONS: dict[str, tuple[str, Decimal]] = {
    "second": ("hour", SECONDS_PER_HOUR),
    "minute": ("hour", Decimal(60)),
    "gb-second": ("GB-month", SECONDS_PER_HOUR * HOURS_PER_MONTH),
    "gb-minute": ("GB-month", Decimal(60) * HOURS_PER_MONTH),
    "gb-hour": ("GB-month", HOURS_PER_MONTH),
}
# Units whose plural is written with an "s".
_COUNTED = {"second", "minute", "hour", "day", "month", "GB-month", "GB-hour", "GB-second", "GB-minute", "unit",
            "request", "address", "plan", "seat"}


@dataclass(frozen=True)
class Readable:
    """A quantity for reading (`text`, e.g. "480 hours") and as metered (`exact`,
    e.g. "1,728,000 seconds")."""

    text: str
    exact: str
    value: Decimal
    unit: str


def plural(unit: str, quantity: Decimal) -> str:
    """"second" -> "seconds" unless the quantity is exactly one; "address per month"
    -> "addresses per month"; units like "GB" stay as they are."""
    if quantity == 1 or not unit:
        return unit
    head, space, rest = unit.partition(" ")
    if head in _COUNTED or head.lower() in _COUNTED:
        head = head + ("es" if head.endswith(("s", "sh", "ch")) else "s")
    return head + space + rest


def exact_text(quantity: Decimal) -> str:
    """Every digit of a decimal, with thousands separators: 1728000.5 -> "1,728,000.5"."""
    text = f"{quantity.normalize():f}" if quantity else "0"
    whole, dot, fraction = text.partition(".")
    sign = "-" if whole.startswith("-") else ""
    return f"{sign}{int(whole.lstrip('-')):,}{dot}{fraction}"


def rounded_text(quantity: Decimal) -> str:
    """A figure rounded for reading: two decimals below 10, one below 1,000, none
    above; trailing zeros dropped; "< 0.01" for a small non-zero figure."""
    if quantity == 0:
        return "0"
    if 0 < abs(quantity) < Decimal("0.005"):
        return "< 0.01"
    places = 2 if abs(quantity) < 10 else 1 if abs(quantity) < 1000 else 0
    text = f"{quantity.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP):,f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def readable(quantity: Decimal, unit: str) -> Readable:
    """The quantity in the unit a person thinks in, with the exact metered figure."""
    quantity = Decimal(quantity)
    exact = f"{exact_text(quantity)} {plural(unit, quantity)}".strip()
    conversion = _CONVERSIONS.get(unit.strip().lower())
    if conversion is None:
        return Readable(text=f"{rounded_text(quantity)} {plural(unit, quantity)}".strip(), exact=exact,
                        value=quantity, unit=unit)
    person_unit, per = conversion
    value = quantity / per
    return Readable(text=f"{rounded_text(value)} {plural(person_unit, value)}", exact=exact, value=value,
                    unit=person_unit)


def days_between(start: datetime, end: datetime) -> Readable:
    """A span of time in days (e.g. a service attached for part of the period), with
    the exact span as hours and minutes."""
    seconds = max(0, int((end - start).total_seconds()))
    days = Decimal(seconds) / Decimal(86400)
    hours, rest = divmod(seconds, 3600)
    return Readable(text=f"{rounded_text(days)} {plural('day', days)}",
                    exact=f"{hours:,} h {rest // 60:02d} min", value=days, unit="day")


def last_day(period_end: datetime) -> datetime:
    """The last day a period covers: periods end exclusively at midnight (the next
    period starts at that instant), and people read the day before as the end."""
    return period_end - timedelta(microseconds=1)


def period_text(start: datetime, end: datetime) -> str:
    """A billing period as people write it, both ends inclusive: "1 Nov – 30 Nov 2026"
    (or "15 Dec 2026 – 14 Jan 2027" across a year)."""
    last = last_day(end)
    if start.year == last.year:
        return f"{start.day} {start:%b} – {last.day} {last:%b %Y}"
    return f"{start.day} {start:%b %Y} – {last.day} {last:%b %Y}"
