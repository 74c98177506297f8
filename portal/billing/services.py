"""Recurring services attached to organizations, and what they are charged.

The proration rule: a service is charged quantity x its price per cycle x (seconds
attached within the invoice's period / seconds in the billing cycle), rounded once
to the cent by the money module. While it stays attached its charge runs to the end of the cycle (what
the cycle will cost if nothing changes); detaching reprices it to the second. Each
attachment is its own item, so the invoice shows when each service was attached.
A quantity change ends the current attachment and starts a new one at the new
quantity, from the same instant: each span is charged at its own quantity.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import partial

from sqlalchemy import or_, select

from portal import money
from portal.billing.cycles import cycle_containing
from portal.billing.invoices import ensure_open_invoice
from portal.billing.pricing import set_item
from portal.extensions import db
from portal.models import Invoice, InvoiceItem, Organization, Product, ServiceAttachment
from portal.models.types import utcnow


class ServiceError(ValueError):
    """A service request that cannot be honoured (wrong product, already detached...)."""


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


def _charge(attachment: ServiceAttachment, invoice: Invoice) -> bool:
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


def attach_service(organization: Organization, product: Product, quantity: Decimal, resource: str,
                   now: datetime | None = None) -> ServiceAttachment:
    """Attach a recurring service from now and charge it on the open invoice."""
    now = now or utcnow()
    if product.kind != "recurring":
        raise ServiceError(f"product {product.code!r} is metered: report its usage instead")
    if not product.active:
        raise ServiceError(f"product {product.code!r} is no longer sold")
    if quantity <= 0:
        raise ServiceError("quantity must be greater than zero")
    invoice = ensure_open_invoice(organization, now, lock=True)  # not claimed by a close until we commit
    attachment = ServiceAttachment(organization=organization, product=product, quantity=quantity,
                                   resource=resource, attached_at=now)
    db.session.add(attachment)
    db.session.flush()
    _charge(attachment, invoice)
    return attachment


def detach_service(attachment: ServiceAttachment, now: datetime | None = None) -> bool:
    """Detach from now and reprice its charge on the open invoice to the second.
    Returns False (and changes nothing) if it was detached already."""
    if attachment.detached_at is not None:
        return False
    now = now or utcnow()
    invoice = ensure_open_invoice(attachment.organization, now, lock=True)  # not claimed by a close until we commit
    attachment.detached_at = max(now, attachment.attached_at)
    db.session.flush()
    if attachment.attached_at < invoice.period_end:
        _charge(attachment, invoice)
    return True


def change_quantity(attachment: ServiceAttachment, quantity: Decimal,
                    now: datetime | None = None) -> ServiceAttachment:
    """End this attachment now and start a new one at `quantity` from the same instant."""
    if attachment.detached_at is not None:
        raise ServiceError("the service is detached already")
    now = now or utcnow()
    detach_service(attachment, now)
    return attach_service(attachment.organization, attachment.product, quantity, attachment.resource,
                          attachment.detached_at)


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
    return sum(_charge(attachment, invoice) for attachment in attachments)


def attachable_products() -> list[Product]:
    """The catalog's services a customer may attach (recurring and still sold)."""
    return list(db.session.scalars(
        select(Product).where(Product.kind == "recurring", Product.active.is_(True)).order_by(Product.name)
    ))


@dataclass(frozen=True)
class ServiceQuote:
    """What a change to the services does to the open invoice, in integer cents, by
    the formula that bills it (`service_charge_cents`)."""

    amount_cents: int  # the attachment's charge on the open invoice after the change
    change_cents: int  # how the invoice's total moves (negative: it goes down)
    until: datetime  # the end of the period the charge runs to
    currency: str


def quote_attachment(organization: Organization, product: Product, quantity: Decimal,
                     now: datetime | None = None) -> ServiceQuote:
    """What attaching `quantity` of `product` now costs for the rest of the period.
    Reads only; raises ServiceError for what `attach_service` would refuse."""
    now = now or utcnow()
    if product.kind != "recurring" or not product.active:
        raise ServiceError(f"product {product.code!r} is not a service that can be attached")
    if quantity <= 0:
        raise ServiceError("quantity must be greater than zero")
    invoice = _open_or_next(organization, now)
    amount = service_charge_cents(product, quantity, now, invoice.period_end, invoice=invoice,
                                  anchor_day=organization.cycle_anchor_day)
    return ServiceQuote(amount, amount, invoice.period_end, invoice.currency)


def quote_detachment(attachment: ServiceAttachment, now: datetime | None = None) -> ServiceQuote:
    """What detaching now takes off the open invoice (the rest of the period's charge)."""
    now = now or utcnow()
    if attachment.detached_at is not None:
        raise ServiceError("the service is detached already")
    organization = attachment.organization
    invoice = _open_or_next(organization, now)
    charge = partial(service_charge_cents, attachment.product, attachment.quantity, attachment.attached_at,
                     invoice=invoice, anchor_day=organization.cycle_anchor_day)
    whole, kept = charge(invoice.period_end), charge(max(now, attachment.attached_at))
    return ServiceQuote(kept, kept - whole, invoice.period_end, invoice.currency)


def _open_or_next(organization: Organization, now: datetime) -> Invoice:
    """The open invoice, or (unsaved) the one `attach_service` would open."""
    from portal.billing.invoices import open_invoice

    invoice = open_invoice(organization)
    if invoice is None:
        start, end = cycle_containing(now, organization.cycle_anchor_day)
        invoice = Invoice(organization_id=organization.id, period_start=start, period_end=end,
                          currency=organization.currency)
    return invoice
