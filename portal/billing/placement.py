"""Where usage is priced: the invoice a timestamp belongs to, and usage that waited
for a new invoice to open (`price_pending_usage`).

Below both `invoices` (which prices waiting usage onto an invoice it opens) and
`usage` (which opens invoices while it ingests), so neither imports the other back.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select, update

from portal.billing.cycles import cycle_containing
from portal.billing.pricing import ItemDelta, add_quantities
from portal.extensions import db
from portal.models import Invoice, Product, UsageEvent


@dataclass
class Placement:
    """An organization's open invoice (id and period), its billing anchor, and the
    periods of its other invoices that could hold the batch's timestamps."""

    open_id: int
    open_start: datetime
    open_end: datetime
    anchor_day: int
    closed: list[tuple[datetime, datetime]] = field(default_factory=list)

    @classmethod
    def of(cls, invoice: Invoice, anchor_day: int) -> Placement:
        return cls(invoice.id, invoice.period_start, invoice.period_end, anchor_day)


def place_usage(placement: Placement, at: datetime) -> tuple[int | None, tuple | None]:
    """(id of the invoice to price onto, origin period for a late line), or (None, None)
    for usage after the open invoice's period, priced when the next invoice opens."""
    if placement.open_start <= at < placement.open_end:
        return placement.open_id, None
    if at >= placement.open_end:
        return None, None
    for start, end in placement.closed:
        if start <= at < end:
            return placement.open_id, (start, end)
    start, end = cycle_containing(at, placement.anchor_day)
    return placement.open_id, (start, min(end, placement.open_start))


def price_pending_usage(invoice: Invoice) -> int:
    """Price the organization's stored-but-unpriced usage onto `invoice` (its newly
    open invoice). Returns the number of events priced. Idempotent: each event is
    claimed for the invoice by a conditional update before it is priced."""
    pending = db.session.execute(
        update(UsageEvent)
        .where(
            UsageEvent.organization_id == invoice.organization_id,
            UsageEvent.invoice_id.is_(None),
            UsageEvent.occurred_at < invoice.period_end,
        )
        .values(invoice_id=invoice.id)
        .returning(UsageEvent.product_id, UsageEvent.resource, UsageEvent.quantity, UsageEvent.occurred_at)
        .execution_options(synchronize_session=False)
    ).all()
    if not pending:
        return 0
    placement = Placement.of(invoice, invoice.organization.cycle_anchor_day)
    products = {p.id: p for p in db.session.scalars(select(Product).where(
        Product.id.in_({row.product_id for row in pending})))}
    deltas: dict[tuple, Decimal] = defaultdict(Decimal)
    for row in pending:
        _, origin = place_usage(placement, row.occurred_at)
        deltas[(row.product_id, row.resource, origin)] += row.quantity
    add_quantities([ItemDelta(invoice.id, products[product_id], resource, quantity, origin)
                    for (product_id, resource, origin), quantity in deltas.items()])
    return len(pending)
