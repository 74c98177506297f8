"""What the support pages read: organizations, their invoices and sync history,
Stripe events, and the invoices whose sync needs a human. Each page is a fixed,
small number of queries however many items, runs or events there are."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import aliased, joinedload

from portal.billing.credits import credit_items
from portal.billing.sync import SYNCABLE_STATUSES
from portal.customer.overview import BillingOverview, billing_overview
from portal.extensions import db
from portal.models import AuditEntry, Invoice, InvoiceItem, Organization, ServiceAttachment, StripeEvent, SyncRun
from portal.models.types import utcnow

# Invoices a sync still works on; a closed invoice's sync history is just history.

GOOD_OUTCOMES = ("synced", "unchanged")
# Unsynced changes older than this are a discrepancy: the sweep runs every minute.
PENDING_TOO_LONG = timedelta(minutes=10)
RECENT_SYNC_RUNS = 25
RECENT_STRIPE_EVENTS = 25
RECENT_INVOICES = 36
RECENT_SERVICES = 50
RECENT_AUDIT = 25
DISCREPANCIES_PER_PAGE = 50


def unsynced_invoice_count() -> int:
    return db.session.scalar(
        select(func.count()).select_from(Invoice).where(Invoice.change_seq > Invoice.synced_seq)
    )


def organization_by_slug(slug: str) -> Organization | None:
    return db.session.scalar(select(Organization).where(Organization.slug == slug))


@dataclass
class Page:
    """One page of a longer list, newest first: `has_next` when older rows follow."""

    rows: list
    page: int
    has_next: bool


def paged(query, page: int, per_page: int) -> Page:
    """Run `query` (ordered) for one page: `per_page` rows and whether more follow."""
    page = max(page, 1)
    rows = list(db.session.scalars(query.offset((page - 1) * per_page).limit(per_page + 1)))
    return Page(rows[:per_page], page, len(rows) > per_page)


@dataclass
class OrganizationOverview:
    organization: Organization
    customer: BillingOverview
    invoices: list[Invoice]
    open_invoice: Invoice | None
    sync_runs: Page
    stripe_events: Page
    services: list[ServiceAttachment]
    credits: list[InvoiceItem]
    audit: list[AuditEntry]


def organization_overview(organization: Organization, sync_page: int = 1, events_page: int = 1) -> OrganizationOverview:
    """Everything the support page of one organization shows: what its customer sees,
    then its invoices, sync runs and Stripe events (a page each), services history,
    credits and its newest audit entries. A fixed number of queries."""
    customer = billing_overview(organization)
    invoices = list(
        db.session.scalars(
            select(Invoice)
            .where(Invoice.organization_id == organization.id)
            .order_by(Invoice.period_start.desc(), Invoice.id.desc())
            .limit(RECENT_INVOICES)
        )
    )
    sync_runs = paged(
        select(SyncRun)
        .join(Invoice, Invoice.id == SyncRun.invoice_id)
        .where(Invoice.organization_id == organization.id)
        .order_by(SyncRun.started_at.desc(), SyncRun.id.desc()),
        sync_page, RECENT_SYNC_RUNS)
    services = list(
        db.session.scalars(
            select(ServiceAttachment)
            .where(ServiceAttachment.organization_id == organization.id)
            .options(joinedload(ServiceAttachment.product))
            .order_by(ServiceAttachment.attached_at.desc(), ServiceAttachment.id.desc())
            .limit(RECENT_SERVICES)
        )
    )
    return OrganizationOverview(organization, customer, invoices, customer.current, sync_runs,
                                stripe_events_of_organization(organization, events_page), services,
                                credit_items(organization), audit_of_organization(organization))


def stripe_events_of_organization(organization: Organization, page: int = 1) -> Page:
    """A page of the Stripe events about the organization (its customer, its invoices),
    newest first, by the indexed `organization_id` the event was given when stored."""
    return paged(
        select(StripeEvent)
        .where(StripeEvent.organization_id == organization.id)
        .order_by(StripeEvent.received_at.desc(), StripeEvent.id.desc()),
        page, RECENT_STRIPE_EVENTS)


def stripe_events_of_invoice(invoice_id: int, limit: int = RECENT_STRIPE_EVENTS) -> list[StripeEvent]:
    """The newest Stripe events about the invoice (its Stripe draft, its lines, its
    payment), by the indexed `invoice_id`."""
    return list(
        db.session.scalars(
            select(StripeEvent)
            .where(StripeEvent.invoice_id == invoice_id)
            .order_by(StripeEvent.received_at.desc(), StripeEvent.id.desc())
            .limit(limit)
        )
    )


def audit_of_organization(organization: Organization, limit: int = RECENT_AUDIT) -> list[AuditEntry]:
    return list(db.session.scalars(
        select(AuditEntry)
        .where(AuditEntry.organization_id == organization.id)
        .order_by(AuditEntry.created_at.desc(), AuditEntry.id.desc())
        .limit(limit)
    ))


@dataclass
class Discrepancy:
    invoice: Invoice
    last_sync: SyncRun | None
    pending_since: datetime | None
    reasons: list[str] = field(default_factory=list)


def discrepancies(now: datetime | None = None, page: int = 1,
                  per_page: int = DISCREPANCIES_PER_PAGE) -> tuple[list[Discrepancy], bool]:
    """Open and closing invoices whose sync needs a look: blocked; or the last
    finished sync did not end synced/unchanged; or changes have waited for Stripe
    longer than PENDING_TOO_LONG. One query.

    "Last sync" skips runs that found the invoice locked: they did nothing, and the
    run that held the lock is the one that tells. How long changes have waited:
    from the oldest item changed since the last good sync started (an item changed
    twice counts from its latest change, so this errs towards "not yet"), or, when
    no such item is found, from that sync's start (or the invoice's creation).
    One page of them, by invoice id, and whether more follow."""
    now = now or utcnow()
    last_finished_id = (
        select(SyncRun.id)
        .where(SyncRun.invoice_id == Invoice.id, SyncRun.finished_at.is_not(None), SyncRun.outcome != "locked")
        .order_by(SyncRun.started_at.desc(), SyncRun.id.desc())
        .limit(1)
        .correlate(Invoice)
        .scalar_subquery()
    )
    last_good_start = (
        select(func.max(SyncRun.started_at))
        .where(SyncRun.invoice_id == Invoice.id, SyncRun.outcome.in_(GOOD_OUTCOMES))
        .correlate(Invoice)
        .scalar_subquery()
    )
    oldest_change = (
        select(func.min(InvoiceItem.updated_at))
        .where(InvoiceItem.invoice_id == Invoice.id,
               or_(last_good_start.is_(None), InvoiceItem.updated_at > last_good_start))
        .correlate(Invoice)
        .scalar_subquery()
    )
    unsynced = Invoice.change_seq > Invoice.synced_seq
    pending_since = case((unsynced, func.coalesce(oldest_change, last_good_start, Invoice.created_at)),
                         else_=None).label("pending_since")
    last_run = aliased(SyncRun, name="last_run")
    rows = db.session.execute(
        select(Invoice, last_run, pending_since)
        .outerjoin(last_run, last_run.id == last_finished_id)
        .where(
            Invoice.status.in_(SYNCABLE_STATUSES),
            # Candidates first, from the invoice's own columns (indexed), so the runs and
            # items are looked at only for the few invoices that can be a problem.
            or_(Invoice.sync_blocked.is_not(None), Invoice.last_sync_outcome.not_in(GOOD_OUTCOMES),
                Invoice.change_seq > Invoice.synced_seq),
            or_(
                Invoice.sync_blocked.is_not(None),
                and_(last_run.id.is_not(None), last_run.outcome.not_in(GOOD_OUTCOMES)),
                and_(unsynced, pending_since < now - PENDING_TOO_LONG),
            ),
        )
        .options(joinedload(Invoice.organization))
        .order_by(Invoice.id)
        .offset((max(page, 1) - 1) * per_page)
        .limit(per_page + 1)
    ).all()
    found = []
    for invoice, run, since in rows[:per_page]:
        entry = Discrepancy(invoice, run, since)
        if invoice.sync_blocked:
            entry.reasons.append(f"sync blocked: {invoice.sync_blocked}")
        if run is not None and run.outcome not in GOOD_OUTCOMES:
            entry.reasons.append(f"last sync: {run.outcome}")
        if since is not None and since < now - PENDING_TOO_LONG:
            entry.reasons.append("changes waiting for Stripe for more than "
                                 f"{int(PENDING_TOO_LONG.total_seconds() // 60)} minutes")
        found.append(entry)
    return found, len(rows) > per_page


def failed_stripe_events(limit: int = 200) -> list[StripeEvent]:
    """Stored Stripe events not processed yet (failing ones first: they have attempts)."""
    return list(
        db.session.scalars(
            select(StripeEvent)
            .where(StripeEvent.processed_at.is_(None))
            .order_by(StripeEvent.attempts.desc(), StripeEvent.received_at)
            .limit(limit)
        )
    )


def collection_problems(limit: int = 200) -> list[Invoice]:
    """Finalized invoices whose collection failed or waits for the customer, and
    invoices Stripe could not finalize on its own; oldest first."""
    return list(
        db.session.scalars(
            select(Invoice)
            .where(or_(
                and_(Invoice.status == "finalized",
                     or_(Invoice.payment_attempts > 0, Invoice.payment_problem.is_not(None))),
                Invoice.finalization_error.is_not(None),
            ))
            .options(joinedload(Invoice.organization))
            .order_by(Invoice.period_end, Invoice.id)
            .limit(limit)
        )
    )


def portal_refusals(since: timedelta = timedelta(days=7), limit: int = 20) -> list[AuditEntry]:
    """Recent refusals by Stripe to open its customer portal (a setting to fix)."""
    from portal.customer.payment_methods import PORTAL_REFUSED

    return list(
        db.session.scalars(
            select(AuditEntry)
            .where(AuditEntry.action == PORTAL_REFUSED, AuditEntry.created_at > utcnow() - since)
            .order_by(AuditEntry.created_at.desc())
            .limit(limit)
        )
    )


def open_invoice_of(organization: Organization) -> Invoice | None:
    return db.session.scalar(
        select(Invoice).where(Invoice.organization_id == organization.id, Invoice.status == "open"))
