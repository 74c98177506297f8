"""Pricing: turning quantities into invoice items with integer-cent amounts.

`add_quantity` is the one way an item's quantity changes. It is safe under
concurrency: the item row is locked (SELECT ... FOR UPDATE on PostgreSQL; SQLite
serialises writers) before it is read, so concurrent writers to one item never
lose an update, and the invoice's total and change counter move by atomic
`UPDATE ... SET x = x + :delta` in the same transaction.
"""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from portal import money
from portal.extensions import db
from portal.models import Invoice, InvoiceItem, Product


def line_key(product: Product, resource: str, origin_period_start: datetime | None = None) -> str:
    """What makes an item unique on its invoice: product, resource, and for late
    usage the period it came from."""
    origin = origin_period_start.strftime("%Y%m%dT%H%M%S") if origin_period_start else ""
    return f"{product.code}|{resource}|{origin}"


def describe(product: Product, resource: str, origin: tuple[datetime, datetime] | None) -> str:
    text = product.name + (f" ({resource})" if resource else "")
    if origin:
        text += f", usage of {origin[0]:%Y-%m-%d} to {origin[1]:%Y-%m-%d}"
    return text


def _insert(dialect_name: str):
    return postgresql.insert if dialect_name == "postgresql" else sqlite.insert


def mark_changed(invoice_id: int, amount_delta: int = 0) -> None:
    """Record a change to an invoice's items (moves its total; marks it unsynced)."""
    db.session.execute(
        update(Invoice)
        .where(Invoice.id == invoice_id)
        .values(
            total_cents=Invoice.total_cents + amount_delta,
            change_seq=Invoice.change_seq + 1,
        )
        .execution_options(synchronize_session=False)
    )


def add_quantity(
    invoice: Invoice,
    product: Product,
    resource: str,
    delta: Decimal,
    origin: tuple[datetime, datetime] | None = None,
) -> InvoiceItem:
    """Add `delta` units of `product` for `resource` to the invoice, repricing the
    item's amount (rounded once, by the money module) and the invoice's total."""
    key = line_key(product, resource, origin[0] if origin else None)
    insert = _insert(db.engine.dialect.name)
    db.session.execute(
        insert(InvoiceItem)
        .values(
            invoice_id=invoice.id,
            product_id=product.id,
            line_key=key,
            resource=resource,
            description=describe(product, resource, origin),
            quantity=Decimal(0),
            unit_price=product.unit_price,
            amount_cents=0,
            origin_period_start=origin[0] if origin else None,
            origin_period_end=origin[1] if origin else None,
            version=1,
        )
        .on_conflict_do_nothing(index_elements=["invoice_id", "line_key"])
    )
    item = db.session.scalar(
        select(InvoiceItem)
        .where(InvoiceItem.invoice_id == invoice.id, InvoiceItem.line_key == key)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    new_quantity = item.quantity + delta
    if new_quantity < 0:
        raise money.MoneyError("an item's quantity cannot go below zero")
    new_amount = money.line_amount(new_quantity, item.unit_price)
    amount_delta = new_amount - item.amount_cents
    item.quantity = new_quantity
    item.amount_cents = new_amount
    item.version += 1
    db.session.flush()
    mark_changed(invoice.id, amount_delta)
    return item
