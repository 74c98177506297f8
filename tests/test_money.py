"""The money module: one rounding rule, and no path that loses or invents a cent."""
from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal import money

quantities = st.decimals(min_value=0, max_value=10**9, places=9, allow_nan=False, allow_infinity=False)
prices = st.decimals(min_value=0, max_value=10**6, places=10, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize(
    ("quantity", "price", "cents"),
    [
        ("1", "0.5", 1),  # a half cent rounds up
        ("1", "1.5", 2),
        ("1", "2.5", 3),  # half away from zero, not to even
        ("3", "0.0011", 0),
        ("1728000", "0.0011", 1901),  # 1900.8
        ("1296000.5", "0.0011", 1426),  # 1425.60055
        ("0", "2900", 0),
    ],
)
def test_line_amount_rounds_once_half_away_from_zero(quantity, price, cents):
    assert money.line_amount(Decimal(quantity), Decimal(price)) == cents


def test_negative_exact_amount_rounds_half_away_from_zero():
    assert money.round_cents(Decimal("-2.5")) == -3
    assert money.round_cents(Decimal("-2.4")) == -2


@given(quantities, prices)
def test_rounding_error_of_a_line_is_at_most_half_a_cent(quantity, price):
    exact = quantity * price
    assert abs(Decimal(money.line_amount(quantity, price)) - exact) <= Decimal("0.5")


@given(st.lists(st.tuples(quantities, prices), max_size=60))
def test_invoice_total_is_the_sum_of_its_lines(lines):
    amounts = [money.line_amount(q, p) for q, p in lines]
    assert money.total(amounts) == sum(amounts)
    # The total's distance from the exact sum is bounded by half a cent per line:
    # no rounding path adds or drops more than its own line's rounding.
    exact = sum((q * p for q, p in lines), Decimal(0))
    assert abs(Decimal(money.total(amounts)) - exact) <= Decimal("0.5") * len(lines)


@given(st.lists(quantities, min_size=1, max_size=30), prices)
def test_adding_quantity_in_steps_gives_the_same_amount_as_at_once(steps, price):
    # Pricing reprices the aggregate quantity each time; the final amount depends
    # only on the final quantity, never on how it was reached.
    running = Decimal(0)
    amount = 0
    for step in steps:
        running += step
        amount = money.line_amount(running, price)
    assert amount == money.line_amount(sum(steps, Decimal(0)), price)


@given(quantities, prices, st.integers(min_value=1, max_value=31 * 86400), st.data())
def test_prorated_amount_is_bounded_by_the_full_charge(quantity, price, period, data):
    attached = data.draw(st.integers(min_value=0, max_value=period))
    prorated = money.prorated_amount(quantity, price, attached, period)
    full = money.line_amount(quantity, price)
    assert 0 <= prorated <= full
    assert money.prorated_amount(quantity, price, period, period) == full
    assert money.prorated_amount(quantity, price, 0, period) == 0


@given(st.integers(min_value=1, max_value=20), st.data())
def test_prorated_parts_of_a_period_sum_to_the_whole_within_a_cent_per_part(parts, data):
    period = 30 * 86400
    cuts = sorted(data.draw(st.lists(st.integers(1, period - 1), min_size=parts - 1, max_size=parts - 1)))
    bounds = [0, *cuts, period]
    spans = [end - start for start, end in zip(bounds, bounds[1:], strict=False)]
    pieces = [money.prorated_amount(Decimal(1), Decimal("2900"), span, period) for span in spans]
    assert abs(sum(pieces) - 2900) <= parts / 2


def test_total_refuses_anything_but_integer_cents():
    with pytest.raises(money.MoneyError):
        money.total([1, Decimal("0.5")])
    with pytest.raises(money.MoneyError):
        money.total([True])


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-1", "1e13", "abc", "", True, None, float("nan"), "0.0000000001"])
def test_quantity_refuses_what_cannot_be_billed(bad):
    with pytest.raises(money.MoneyError):
        money.quantity(bad)


@pytest.mark.parametrize(("given_value", "parsed"), [("1.5", Decimal("1.5")), (2, Decimal(2)), (0.1, Decimal("0.1"))])
def test_quantity_accepts_decimal_text_integers_and_json_floats(given_value, parsed):
    assert money.quantity(given_value) == parsed


@pytest.mark.parametrize(
    ("cents", "currency", "shown"),
    [(123456, "usd", "$1,234.56"), (-5, "usd", "-$0.05"), (100, "chf", "1.00 CHF"), (0, "eur", "€0.00")],
)
def test_format_money(cents, currency, shown):
    assert money.format_money(cents, currency) == shown


def test_format_price_keeps_every_decimal_place():
    assert money.format_price(Decimal("0.0011")) == "$0.000011"
    assert money.format_price(Decimal("2900")) == "$29.00"
