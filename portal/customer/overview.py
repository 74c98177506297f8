"""What the customer's billing page shows, read from the portal's database in a
fixed, small number of queries (never from Stripe)."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import joinedload

from portal.customer.current import CurrentInvoice, current_invoice
from portal.extensions import db
from portal.models import Invoice, InvoiceItem, Organization, ServiceAttachment, SyncRun


@dataclass
class BillingOverview:
    organization: Organization
    current: Invoice | None
    last_sync: SyncRun | None
    services: list[ServiceAttachment]
    past: list[Invoice]
    current_view: CurrentInvoice | None = None


def last_finished_sync(invoice_id: int) -> SyncRun | None:
    """The latest finished sync of the invoice. A run still going has no outcome yet,
    and one that found the invoice locked did nothing (the run holding the lock tells)."""
    return db.session.scalar(
        select(SyncRun)
        .where(SyncRun.invoice_id == invoice_id, SyncRun.finished_at.is_not(None), SyncRun.outcome != "locked")
        .order_by(SyncRun.started_at.desc(), SyncRun.id.desc())
        .limit(1)
    )


def active_services(organization: Organization) -> list[ServiceAttachment]:
    return list(
        db.session.scalars(
            select(ServiceAttachment)
            .where(ServiceAttachment.organization_id == organization.id, ServiceAttachment.detached_at.is_(None))
            .options(joinedload(ServiceAttachment.product))
            .order_by(ServiceAttachment.attached_at, ServiceAttachment.id)
        )
    )


def open_invoice_with_items(organization: Organization) -> Invoice | None:
    """The open invoice with its items and their products, in one query."""
    return db.session.scalars(
        select(Invoice)
        .where(Invoice.organization_id == organization.id, Invoice.status == "open")
        .options(joinedload(Invoice.items).joinedload(InvoiceItem.product))
    ).unique().first()


def billing_overview(organization: Organization) -> BillingOverview:
    """The open invoice with its items (and what its partial shows), its last sync,
    the services attached now, and the earlier invoices (without their items: the
    page lists them only)."""
    current = open_invoice_with_items(organization)
    past = list(
        db.session.scalars(
            select(Invoice)
            .where(Invoice.organization_id == organization.id, Invoice.status != "open")
            .order_by(Invoice.period_start.desc(), Invoice.id.desc())
        )
    )
    last_sync = last_finished_sync(current.id) if current else None
    return BillingOverview(
        organization=organization,
        current=current,
        last_sync=last_sync,
        services=active_services(organization),
        past=past,
        current_view=current_invoice(current, last_sync) if current else None,
    )
