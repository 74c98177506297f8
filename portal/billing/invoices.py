"""Invoices of an organization: finding and opening the current one."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from portal.billing.cycles import cycle_containing
from portal.billing.placement import price_pending_usage
from portal.billing.service_charges import charge_services
from portal.extensions import db
from portal.models import Invoice, Organization
from portal.models.types import utcnow


def open_invoice(organization: Organization, lock: bool = False) -> Invoice | None:
    """The organization's open invoice, if it has one. With `lock`, its row stays
    locked until the transaction ends, so it cannot be claimed for closing meanwhile
    (a close that claimed it first is waited for, and its successor returned)."""
    query = select(Invoice).where(Invoice.organization_id == organization.id, Invoice.status == "open")
    if lock:
        query = query.with_for_update(key_share=True).execution_options(populate_existing=True)
    return db.session.scalar(query)


def ensure_open_invoice(organization: Organization, at: datetime | None = None,
                        period: tuple[datetime, datetime] | None = None, lock: bool = False) -> Invoice:
    """The open invoice, created for the cycle holding `at` (or for exactly `period`)
    when there is none. With `lock`, it stays open until the caller's transaction
    ends: whoever writes items to "the open invoice" asks for that, so an item never
    lands on an invoice that a concurrent close has just claimed.

    Safe under concurrency: the partial unique index allows one open invoice per
    organization, so a racing creator loses, rolls back to its savepoint, and reads
    the winner's row. A new invoice is charged for the services attached during its
    period and priced for usage that arrived for it before it opened.
    """
    invoice = open_invoice(organization, lock)
    if invoice is not None:
        return invoice
    start, end = period or cycle_containing(at or utcnow(), organization.cycle_anchor_day)
    invoice = Invoice(
        organization_id=organization.id,
        period_start=start,
        period_end=end,
        status="open",
        currency=organization.currency,
    )
    try:
        with db.session.begin_nested():
            db.session.add(invoice)
    except IntegrityError:
        invoice = open_invoice(organization, lock)
        if invoice is None:
            raise
        return invoice
    _fill_new_invoice(invoice)
    return invoice


def _fill_new_invoice(invoice: Invoice) -> None:
    """A new cycle's invoice starts with the services attached during it and the
    usage that arrived for it before it opened."""
    charge_services(invoice)
    price_pending_usage(invoice)
