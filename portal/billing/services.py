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

from datetime import datetime
from decimal import Decimal

from portal.billing.invoices import ensure_open_invoice
from portal.billing.service_charges import charge_attachment
from portal.extensions import db
from portal.models import Organization, Product, ServiceAttachment
from portal.models.types import utcnow


class ServiceError(ValueError):
    """A service request that cannot be honoured (wrong product, already detached...)."""


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
    charge_attachment(attachment, invoice)
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
        charge_attachment(attachment, invoice)
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
