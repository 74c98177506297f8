"""Pricing: turning quantities into invoice items with integer-cent amounts.

`add_quantities` is the one way an item's quantity changes. It is safe under
concurrency: item rows are locked (SELECT ... FOR UPDATE on PostgreSQL; SQLite
serialises writers) before they are read, so concurrent writers to one item never
lose an update, and the invoice's total and change counter move by atomic
`UPDATE ... SET x = x + :delta` in the same transaction.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from portal import money
from portal.billing import bulk
from portal.database import RetryTransaction
from portal.extensions import db
from portal.models import Invoice, InvoiceItem, Product
from portal.models.types import utcnow


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


class InvoiceNoLongerOpen(RetryTransaction):
    """An invoice left `open` between placing quantities on it and locking it."""


@dataclass(frozen=True)
class ItemDelta:
    """Add `quantity` units of `product` for `resource` to an invoice; `origin` is the
    earlier period of a late-usage line, or None."""

    invoice_id: int
    product: Product
    resource: str
    quantity: Decimal
    origin: tuple[datetime, datetime] | None = None

    @property
    def key(self) -> str:
        return line_key(self.product, self.resource, self.origin[0] if self.origin else None)


def add_quantities(deltas: list[ItemDelta], existing: Collection[tuple[int, str]] = ()) -> set[int]:
    """Apply quantity deltas to invoice items, creating the items that are missing,
    repricing each (rounded once, by the money module), and moving each invoice's
    total and change counter. Returns the ids of the invoices changed.

    A few statements however many items there are (see `portal.billing.bulk`):
    insert the missing ones, lock and read all of them in a fixed order (so
    concurrent batches never deadlock), then write their new quantities and amounts
    and move the invoices. Deltas for the same item are added up first, so each item
    is read and written once. `existing` may name (invoice_id, line_key) of items
    known to exist (committed): they are not offered for insertion again.
    """
    merged: dict[tuple[int, str], list] = {}
    for delta in deltas:
        if not delta.quantity:
            continue
        key = (delta.invoice_id, delta.key)
        entry = merged.get(key)
        if entry is None:
            merged[key] = [delta, delta.quantity]
        else:
            entry[1] += delta.quantity
    if not merged:
        return set()
    keys = sorted(merged)  # (invoice_id, line_key): line keys by code point, as COLLATE "C"
    now = utcnow()
    rows = []
    for invoice_id, key in keys:
        if (invoice_id, key) in existing:
            continue
        delta = merged[(invoice_id, key)][0]
        product, origin = delta.product, delta.origin
        rows.append({
            "invoice_id": invoice_id,
            "product_id": product.id,
            "line_key": key,
            "resource": delta.resource,
            "description": describe(product, delta.resource, origin),
            "unit_price": product.unit_price,
            "origin_period_start": origin[0] if origin else None,
            "origin_period_end": origin[1] if origin else None,
        })
    if rows:
        bulk.insert_missing_items(rows, now)
    locked = bulk.lock_items(keys)
    if len(locked) != len(keys):
        raise RuntimeError(f"locked {len(locked)} of {len(keys)} invoice items")
    changes, amount_deltas = [], defaultdict(int)
    for row in locked:
        quantity = row.quantity + merged[(row.invoice_id, row.line_key)][1]
        if quantity < 0:
            raise money.MoneyError("an item's quantity cannot go below zero")
        amount = money.line_amount(quantity, row.unit_price)
        amount_deltas[row.invoice_id] += amount - row.amount_cents
        changes.append({"id": row.id, "quantity": quantity, "amount_cents": amount,
                        "version": row.version + 1, "updated_at": now})
    statuses = bulk.update_items_and_invoices(changes, amount_deltas)
    closed = sorted(invoice_id for invoice_id, status in statuses.items() if status != "open")
    if closed:
        # Placed while open, claimed for closing (or finalized) before this
        # transaction locked it: the batch must be placed again.
        raise InvoiceNoLongerOpen(closed)
    return set(amount_deltas)


def add_quantity(
    invoice: Invoice,
    product: Product,
    resource: str,
    delta: Decimal,
    origin: tuple[datetime, datetime] | None = None,
) -> None:
    """Add `delta` units of `product` for `resource` to the invoice (see add_quantities)."""
    add_quantities([ItemDelta(invoice.id, product, resource, delta, origin)])


def set_item(
    invoice_id: int,
    product: Product,
    key: str,
    *,
    resource: str,
    description: str,
    quantity: Decimal,
    amount_cents: int,
) -> bool:
    """Make the invoice's item `key` carry exactly this quantity and amount (a
    recurring service's charge, which is set rather than added to). Returns whether
    anything changed; an unchanged item keeps its version and the invoice stays synced."""
    insert = _insert(db.engine.dialect.name)
    db.session.execute(
        insert(InvoiceItem)
        .values(invoice_id=invoice_id, product_id=product.id, line_key=key, resource=resource,
                description=description, quantity=Decimal(0), unit_price=product.unit_price,
                amount_cents=0, version=1, updated_at=utcnow())
        .on_conflict_do_nothing(index_elements=["invoice_id", "line_key"])
    )
    row = db.session.execute(
        select(InvoiceItem.id, InvoiceItem.quantity, InvoiceItem.amount_cents, InvoiceItem.description,
               InvoiceItem.version)
        .where(InvoiceItem.invoice_id == invoice_id, InvoiceItem.line_key == key)
        .with_for_update()
    ).one()
    if (row.quantity, row.amount_cents, row.description) == (quantity, amount_cents, description):
        return False
    db.session.execute(
        update(InvoiceItem)
        .where(InvoiceItem.id == row.id)
        .values(quantity=quantity, amount_cents=amount_cents, description=description,
                version=row.version + 1, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    mark_changed(invoice_id, amount_cents - row.amount_cents)
    return True
