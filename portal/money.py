"""Money: decimal prices and quantities in, integer cents out.

The one rounding rule: a line's exact amount (quantity x unit price, in decimal
cents) is rounded once, to the nearest cent, halves away from zero
(ROUND_HALF_UP), at the moment the line's amount is computed. Nothing else
rounds. Sums of lines are sums of those integers, so an invoice's total is exactly
the sum of its lines, and a roll-up line's amount is exactly the sum of the lines
it rolls up. Every amount the portal stores or sends to Stripe comes from here.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import datetime
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation

# Enough digits for a billion units at a ten-place price without silent rounding.
_CONTEXT = Context(prec=60, traps=[InvalidOperation])

# Quantities beyond this are refused as absurd rather than billed.
MAX_QUANTITY = Decimal("1e12")
QUANTITY_PLACES = 9


class MoneyError(ValueError):
    """A value that cannot be billed: not a finite decimal, negative, or absurd."""


# The one grammar for decimals written as text, everywhere the portal reads one (API
# quantities, catalog prices, support's credit amounts, JSON numbers in API bodies):
# ASCII digits, an optional leading '-', an optional '.' and more ASCII digits.
# Nothing else: no '+', no exponent, no '_', no thousands separators, no spaces
# around it, no other scripts' digits, no "NaN" or "Infinity".
DECIMAL_GRAMMAR = re.compile(r"-?[0-9]+(?:\.[0-9]+)?", re.ASCII)
# Longer text is no number anyone bills.
MAX_DECIMAL_TEXT = 64


def _grammar_error(field: str, negative: bool) -> MoneyError:
    sign = "an optional leading '-', " if negative else ""
    return MoneyError(f"{field} must be a finite decimal number written as ASCII digits ({sign}an optional "
                      "'.' fraction; no spaces, separators, '_' or exponent), e.g. \"12.5\"")


def parse_decimal(text: str, *, field: str = "value", negative: bool = False) -> Decimal:
    """Decimal text in the portal's one grammar (DECIMAL_GRAMMAR). A leading '-' only
    when `negative` allows it, and never "-0" (a zero has no sign)."""
    if not isinstance(text, str) or len(text) > MAX_DECIMAL_TEXT or not DECIMAL_GRAMMAR.fullmatch(text):
        raise _grammar_error(field, negative)
    number = Decimal(text)
    if text.startswith("-"):
        if not negative:
            raise MoneyError(f"{field} must not be negative")
        if not number:
            raise MoneyError(f"{field} must not be negative zero")
    return number


def json_number(literal: str) -> Decimal:
    """`parse_float` for API bodies: a JSON number with a fraction or exponent, read
    exactly and held to the same grammar (an exponent is refused)."""
    if len(literal) > MAX_DECIMAL_TEXT or not DECIMAL_GRAMMAR.fullmatch(literal):
        raise ValueError(f"the number {literal[:MAX_DECIMAL_TEXT]} is not plain decimal digits "
                         "(no exponent; write it as e.g. 1000 or 0.5)")
    return Decimal(literal)


def to_decimal(value: object, *, field: str = "value", negative: bool = True) -> Decimal:
    """Parse a price or quantity given as text (DECIMAL_GRAMMAR), int, Decimal or float
    (a float by its shortest repr, the decimal its sender wrote). Refuses bools, NaN
    and infinities, and a negative value (or a signed zero) unless `negative`."""
    if isinstance(value, bool):
        raise MoneyError(f"{field} must be a decimal number")
    if isinstance(value, str):
        return parse_decimal(value, field=field, negative=negative)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MoneyError(f"{field} must be a finite decimal number")
        # A float's shortest repr is the decimal its sender wrote.
        number = Decimal(repr(value))
    elif isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, Decimal):
        number = value
    else:
        raise MoneyError(f"{field} must be a finite decimal number")
    if not number.is_finite():
        raise MoneyError(f"{field} must be a finite decimal number")
    if number.is_signed() and not negative:
        raise MoneyError(f"{field} must not be negative")
    if number.is_signed() and not number:
        raise MoneyError(f"{field} must not be negative zero")
    return number


def quantity(value: object, *, field: str = "quantity", maximum: Decimal = MAX_QUANTITY) -> Decimal:
    """A usage or service quantity: finite, non-negative (and not "-0"), at most
    `maximum` (MAX_QUANTITY unless lower), and with at most nine decimal places (what
    the database keeps)."""
    number = to_decimal(value, field=field, negative=False)
    if number > maximum:
        raise MoneyError(f"{field} is larger than {maximum:f}")
    if number != number.quantize(Decimal(1).scaleb(-QUANTITY_PLACES), context=_CONTEXT):
        raise MoneyError(f"{field} has more than {QUANTITY_PLACES} decimal places")
    return number


def round_cents(exact_cents: Decimal) -> int:
    """Round exact decimal cents to integer cents: nearest, halves away from zero."""
    return int(exact_cents.quantize(Decimal(1), rounding=ROUND_HALF_UP, context=_CONTEXT))


def line_amount(quantity: Decimal, unit_price_cents: Decimal) -> int:
    """The amount of one line in integer cents: quantity x unit price, rounded once."""
    return round_cents(_CONTEXT.multiply(quantity, unit_price_cents))


def prorated_amount(
    quantity: Decimal,
    unit_price_cents: Decimal,
    attached_seconds: int,
    period_seconds: int,
) -> int:
    """A recurring service's charge for the part of the period it was attached, to
    the second: quantity x price x attached/period, rounded once."""
    if period_seconds <= 0:
        raise MoneyError("period must be longer than zero seconds")
    attached_seconds = max(0, min(attached_seconds, period_seconds))
    exact = _CONTEXT.divide(
        _CONTEXT.multiply(_CONTEXT.multiply(quantity, unit_price_cents), Decimal(attached_seconds)),
        Decimal(period_seconds),
    )
    return round_cents(exact)


def extrapolated_amount(priced_quantities: Iterable[tuple[Decimal, Decimal]], basis_seconds: int,
                        ahead_seconds: int) -> int:
    """A run rate carried forward: the exact cost of (quantity, unit price) pairs used
    over `basis_seconds`, scaled to `ahead_seconds`, rounded once. Zero when there is
    no basis or nothing ahead (an estimate, never billed)."""
    if basis_seconds <= 0 or ahead_seconds <= 0:
        return 0
    exact = Decimal(0)
    for quantity_used, unit_price_cents in priced_quantities:
        exact = _CONTEXT.add(exact, _CONTEXT.multiply(quantity_used, unit_price_cents))
    return round_cents(_CONTEXT.divide(_CONTEXT.multiply(exact, Decimal(ahead_seconds)), Decimal(basis_seconds)))


def seconds_between(start: datetime, end: datetime) -> int:
    """Whole seconds from start to end (never negative)."""
    return max(0, int((end - start).total_seconds()))


def total(amounts: Iterable[int]) -> int:
    """The total of integer-cent amounts (a plain sum: no rounding happens here)."""
    result = 0
    for amount in amounts:
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise MoneyError("amounts are integer cents")
        result += amount
    return result


def format_money(cents: int, currency: str = "usd") -> str:
    """Display integer cents, e.g. 123456 usd -> '$1,234.56'."""
    symbol = {"usd": "$", "eur": "€", "gbp": "£"}.get(currency.lower())
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    text = f"{whole:,}.{part:02d}"
    return f"{sign}{symbol}{text}" if symbol else f"{sign}{text} {currency.upper()}"


def format_price(unit_price_cents: Decimal) -> str:
    """A decimal-cent price as dollars for display, without losing precision."""
    dollars = _CONTEXT.divide(unit_price_cents, Decimal(100)).normalize(_CONTEXT)
    text = f"{dollars:f}"
    if "." not in text:
        text += ".00"
    elif len(text.split(".")[1]) < 2:
        text += "0"
    return "$" + text
