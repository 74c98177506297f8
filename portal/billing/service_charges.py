"""What a recurring service attachment is charged on an invoice (the proration rule
is in `services`), and charging every attachment when an invoice opens.

Below both `invoices` (which charges services onto an invoice it opens) and
`services` (which opens invoices when a service is attached), so neither imports
the other back.
"""
from __future__ import annotations

from sqlalchemy import or_, select

from portal import money
from portal.billing.cycles import cycle_containing
from portal.billing.pricing import set_item
from portal.extensions import db
from portal.models import Invoice, ServiceAttachment


def _key(attachment: ServiceAttachment) -> str:
    return f"{attachment.product.code}|{attachment.resource}|svc:{attachment.id}"


def charge_attachment(attachment: ServiceAttachment, invoice: Invoice) -> bool:
    """Set the attachment's prorated charge on the invoice (its own item); True if it changed."""
    start = max(attachment.attached_at, invoice.period_start)
    end = min(attachment.detached_at or invoice.period_end, invoice.period_end)
    seconds = money.seconds_between(start, end)
    # The price is per cycle; an invoice cut short by "close cycle now" covers part of one.
    cycle_start, cycle_end = cycle_containing(invoice.period_start, attachment.organization.cycle_anchor_day)
    amount = money.prorated_amount(
        attachment.quantity, attachment.product.unit_price, seconds,
        money.seconds_between(cycle_start, cycle_end),
    )
    until = f"{attachment.detached_at:%Y-%m-%d %H:%M}" if attachment.detached_at else "end of cycle"
    label = attachment.product.name + (f" ({attachment.resource})" if attachment.resource else "")
    description = f"{label}, from {start:%Y-%m-%d %H:%M} to {until} UTC"
    return set_item(invoice.id, attachment.product, _key(attachment), resource=attachment.resource,
                    description=description, quantity=attachment.quantity, amount_cents=amount)


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
