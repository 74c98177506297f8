"""Quantities and periods as people read them (portal.units)."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from portal.units import days_between, period_text, plural, readable, rounded_text


def utc(*parts) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


def test_machine_seconds_read_as_hours_with_the_exact_seconds_on_hover():
    shown = readable(Decimal("1728000"), "second")
    assert (shown.text, shown.exact) == ("480 hours", "1,728,000 seconds")
    assert shown.value == Decimal(480) and shown.unit == "hour"


def test_a_fraction_of_an_hour_keeps_two_decimals_and_the_exact_figure_every_digit():
    shown = readable(Decimal("1296000.5"), "second")
    assert shown.text == "360 hours" and shown.exact == "1,296,000.5 seconds"
    assert readable(Decimal("5400"), "second").text == "1.5 hours"
    assert readable(Decimal("3600"), "second").text == "1 hour"
    assert readable(Decimal("1"), "second").text == "< 0.01 hours"


@pytest.mark.parametrize(("quantity", "unit", "text"), [
    ("7300", "GB-hour", "10 GB-months"),
    ("730", "GB-hour", "1 GB-month"),
    ("2628000", "GB-second", "1 GB-month"),
    ("43800", "GB-minute", "1 GB-month"),
])
def test_storage_reads_as_gb_months_of_730_hours(quantity, unit, text):
    assert readable(Decimal(quantity), unit).text == text


def test_units_without_a_conversion_stay_as_metered():
    assert readable(Decimal("312.75"), "GB").text == "312.8 GB"
    assert readable(Decimal("312.75"), "GB").exact == "312.75 GB"
    assert readable(Decimal("2"), "address per month").text == "2 addresses per month"
    assert readable(Decimal("12345678"), "request").text == "12,345,678 requests"


def test_rounding_for_reading_never_hides_that_there_is_something():
    assert rounded_text(Decimal(0)) == "0"
    assert rounded_text(Decimal("0.004")) == "< 0.01"
    assert rounded_text(Decimal("9.999")) == "10"
    assert rounded_text(Decimal("1234.5")) == "1,235"


def test_plural_only_for_counted_units():
    assert plural("second", Decimal(1)) == "second"
    assert plural("second", Decimal("1.5")) == "seconds"
    assert plural("GB", Decimal(2)) == "GB"


def test_a_span_reads_in_days_with_hours_and_minutes_exactly():
    span = days_between(utc(2026, 11, 1), utc(2026, 11, 13, 12, 30))
    assert span.text == "12.5 days" and span.exact == "300 h 30 min"


def test_periods_read_with_an_inclusive_end():
    assert period_text(utc(2026, 11, 1), utc(2026, 12, 1)) == "1 Nov – 30 Nov 2026"
    assert period_text(utc(2026, 12, 15), utc(2027, 1, 15)) == "15 Dec 2026 – 14 Jan 2027"
    # A period closed early ends on the day it was closed.
    assert period_text(utc(2026, 11, 1), utc(2026, 11, 20, 14, 5)) == "1 Nov – 20 Nov 2026"
