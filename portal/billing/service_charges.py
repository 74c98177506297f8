"""What a recurring service attachment is charged on an invoice (the proration rule
is in `services`), and charging every attachment when an invoice opens.

Below both `invoices` (which charges services onto an invoice it opens) and
`services` (which opens invoices when a service is attached), so neither imports
the other back.
"""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import or_, select

from portal import money
from portal.billing.cycles import cycle_containing
from portal.billing.pricing import set_item
from portal.extensions import db
from portal.models import Invoice, InvoiceItem, Product, ServiceAttachment


def _key(attachment: ServiceAttachment) -> str:
    return f"{attachment.product.code}|{attachment.resource}|svc:{attachment.id}"


def service_charge_cents(product: Product, quantity: Decimal, start: datetime, end: datetime, *,
                         invoice: Invoice, anchor_day: int) -> int:
    """What `quantity` of the recurring `product` costs on `invoice` for the span
    [start, end), clipped to the invoice's period: the one formula services are billed
    by, also used to quote an attachment and to project the rest of a period."""
    start = max(start, invoice.period_start)
    end = min(end, invoice.period_end)
    seconds = money.seconds_between(start, end)
    # The price is per cycle; an invoice cut short by "close cycle now" covers part of one.
    cycle_start, cycle_end = cycle_containing(invoice.period_start, anchor_day)
    return money.prorated_amount(quantity, product.unit_price, seconds,
                                 money.seconds_between(cycle_start, cycle_end))


def charge_attachment(attachment: ServiceAttachment, invoice: Invoice) -> bool:
    """Set the attachment's prorated charge on the invoice (its own item); True if it changed."""
    start = max(attachment.attached_at, invoice.period_start)
    amount = service_charge_cents(attachment.product, attachment.quantity, attachment.attached_at,
                                  attachment.detached_at or invoice.period_end, invoice=invoice,
                                  anchor_day=attachment.organization.cycle_anchor_day)
    until = f"{attachment.detached_at:%Y-%m-%d %H:%M}" if attachment.detached_at else "end of cycle"
    label = attachment.product.name + (f" ({attachment.resource})" if attachment.resource else "")
    description = f"{label}, from {start:%Y-%m-%d %H:%M} to {until} UTC"
    return set_item(invoice.id, attachment.product, _key(attachment), resource=attachment.resource,
                    description=description, quantity=attachment.quantity, amount_cents=amount)


def charged_cents(attachment: ServiceAttachment, invoice: Invoice) -> int:
    """What the invoice charges for the attachment now (0 if nothing)."""
    amount = db.session.scalar(
        select(InvoiceItem.amount_cents).where(InvoiceItem.invoice_id == invoice.id,
                                               InvoiceItem.line_key == _key(attachment))
    )
    return amount or 0


def charge_services(invoice: Invoice) -> int:
    """Charge every service attached during the invoice's period onto it (run when an
    invoice opens). Idempotent: charges are set, not added. Returns how many changed."""
    attachments = db.session.scalars(
        select(ServiceAttachment).where(
            ServiceAttachment.organization_id == invoice.organization_id,
            ServiceAttachment.attached_at < invoice.period_end,
            or_(ServiceAttachment.detached_at.is_(None), ServiceAttachment.detached_at > invoice.period_start),
        )
    )
    return sum(charge_attachment(attachment, invoice) for attachment in attachments)
