"""The lines a Stripe invoice should carry for a portal invoice.

Stripe allows at most 250 invoice items on one invoice. Up to ROLLUP_THRESHOLD items
each item is its own line; beyond it, the items of one product (and one origin
period, for late usage) roll up into one line whose amount is the exact sum of the
items' amounts, so the Stripe total still equals the portal total to the cent. The
portal keeps showing the per-resource breakdown from its own items.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from portal import money
from portal.models import InvoiceItem

STRIPE_MAX_ITEMS_PER_INVOICE = 250
ROLLUP_THRESHOLD = 200


class TooManyLines(Exception):
    """Even rolled up, the invoice would need more lines than Stripe allows."""


@dataclass
class StripeLine:
    key: str  # stable: "item-<id>" or "product-<code>[-<origin>]"; kept in Stripe metadata
    description: str
    amount_cents: int
    item_ids: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


def _with_quantity(item: InvoiceItem) -> str:
    """The line as the customer reads it on Stripe's invoice: what, and how much."""
    quantity = f"{item.quantity.normalize():,f}" if item.quantity else "0"
    return f"{item.description}: {quantity} {item.product.unit}"


def stripe_lines(items: Iterable[InvoiceItem], threshold: int = ROLLUP_THRESHOLD) -> list[StripeLine]:
    items = sorted(items, key=lambda item: item.id)
    if len(items) <= threshold:
        return [StripeLine(f"item-{item.id}", _with_quantity(item), item.amount_cents, [item.id], [item.version])
                for item in items]
    groups: dict[str, list[InvoiceItem]] = {}
    for item in items:
        origin = f"-{item.origin_period_start:%Y%m%d}" if item.origin_period_start else ""
        groups.setdefault(f"product-{item.product.code}{origin}", []).append(item)
    if len(groups) > STRIPE_MAX_ITEMS_PER_INVOICE:
        raise TooManyLines(f"{len(groups)} product lines exceed Stripe's {STRIPE_MAX_ITEMS_PER_INVOICE}")
    lines = []
    for key, group in groups.items():
        first = group[0]
        description = f"{first.product.name}: {len(group)} resources"
        if first.origin_period_start:
            description += (f", usage of {first.origin_period_start:%Y-%m-%d} to "
                            f"{first.origin_period_end:%Y-%m-%d}")
        lines.append(StripeLine(key, description, money.total(item.amount_cents for item in group),
                                [item.id for item in group], [item.version for item in group]))
    return lines
