"""What the support pages read: organizations, their invoices and sync history,
Stripe events, and the invoices whose sync needs a human. Each page is a fixed,
small number of queries however many items, runs or events there are."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import aliased, joinedload, selectinload

from portal.billing.sync import SYNCABLE_STATUSES
from portal.extensions import db
from portal.models import AuditEntry, Invoice, InvoiceItem, Organization, StripeEvent, SyncRun
from portal.models.types import utcnow

# Invoices a sync still works on; a closed invoice's sync history is just history.

GOOD_OUTCOMES = ("synced", "unchanged")
# Unsynced changes older than this are a discrepancy: the sweep runs every minute.
PENDING_TOO_LONG = timedelta(minutes=10)
ORGANIZATIONS_PER_PAGE = 100
RECENT_SYNC_RUNS = 50
RECENT_STRIPE_EVENTS = 25


def search_organizations(
    term: str = "", limit: int = ORGANIZATIONS_PER_PAGE
) -> list[tuple[Organization, Invoice | None]]:
    """Organizations whose slug or name contains `term` (any case), each with its
    open invoice, by name."""
    query = (
        select(Organization, Invoice)
        .outerjoin(Invoice, (Invoice.organization_id == Organization.id) & (Invoice.status == "open"))
        .order_by(Organization.name, Organization.id)
        .limit(limit)
    )
    term = term.strip()
    if term:
        query = query.where(or_(Organization.slug.icontains(term, autoescape=True),
                                Organization.name.icontains(term, autoescape=True)))
    return [tuple(row) for row in db.session.execute(query).all()]


def unsynced_invoice_count() -> int:
    return db.session.scalar(
        select(func.count()).select_from(Invoice).where(Invoice.change_seq > Invoice.synced_seq)
    )


def organization_by_slug(slug: str) -> Organization | None:
    return db.session.scalar(select(Organization).where(Organization.slug == slug))


@dataclass
class OrganizationOverview:
    organization: Organization
    invoices: list[Invoice]
    open_invoice: Invoice | None
    sync_runs: list[SyncRun]
    stripe_events: list[StripeEvent]


def organization_overview(organization: Organization) -> OrganizationOverview:
    """Everything the support page of one organization shows."""
    invoices = list(
        db.session.scalars(
            select(Invoice)
            .where(Invoice.organization_id == organization.id)
            .order_by(Invoice.period_start.desc(), Invoice.id.desc())
        )
    )
    open_invoice = db.session.scalar(
        select(Invoice)
        .where(Invoice.organization_id == organization.id, Invoice.status == "open")
        .options(selectinload(Invoice.items).joinedload(InvoiceItem.product))
        .execution_options(populate_existing=True)
    )
    sync_runs = list(
        db.session.scalars(
            select(SyncRun)
            .join(Invoice, Invoice.id == SyncRun.invoice_id)
            .where(Invoice.organization_id == organization.id)
            .order_by(SyncRun.started_at.desc(), SyncRun.id.desc())
            .limit(RECENT_SYNC_RUNS)
        )
    )
    return OrganizationOverview(organization, invoices, open_invoice, sync_runs,
                                stripe_events_of_organization(organization.id))


def stripe_events_of_organization(organization_id: int, limit: int = RECENT_STRIPE_EVENTS) -> list[StripeEvent]:
    """The newest Stripe events about the organization (its customer, its invoices),
    by the indexed `organization_id` the event was given when stored."""
    return list(
        db.session.scalars(
            select(StripeEvent)
            .where(StripeEvent.organization_id == organization_id)
            .order_by(StripeEvent.received_at.desc(), StripeEvent.id.desc())
            .limit(limit)
        )
    )


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


@dataclass
class Discrepancy:
    invoice: Invoice
    last_sync: SyncRun | None
    pending_since: datetime | None
    reasons: list[str] = field(default_factory=list)


def discrepancies(now: datetime | None = None) -> list[Discrepancy]:
    """Open and closing invoices whose sync needs a look: blocked; or the last
    finished sync did not end synced/unchanged; or changes have waited for Stripe
    longer than PENDING_TOO_LONG. One query.

    "Last sync" skips runs that found the invoice locked: they did nothing, and the
    run that held the lock is the one that tells. How long changes have waited:
    from the oldest item changed since the last good sync started (an item changed
    twice counts from its latest change, so this errs towards "not yet"), or, when
    no such item is found, from that sync's start (or the invoice's creation)."""
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
            or_(
                Invoice.sync_blocked.is_not(None),
                and_(last_run.id.is_not(None), last_run.outcome.not_in(GOOD_OUTCOMES)),
                and_(unsynced, pending_since < now - PENDING_TOO_LONG),
            ),
        )
        .options(joinedload(Invoice.organization))
        .order_by(Invoice.id)
    ).all()
    found = []
    for invoice, run, since in rows:
        entry = Discrepancy(invoice, run, since)
        if invoice.sync_blocked:
            entry.reasons.append(f"sync blocked: {invoice.sync_blocked}")
        if run is not None and run.outcome not in GOOD_OUTCOMES:
            entry.reasons.append(f"last sync: {run.outcome}")
        if since is not None and since < now - PENDING_TOO_LONG:
            entry.reasons.append("changes waiting for Stripe for more than "
                                 f"{int(PENDING_TOO_LONG.total_seconds() // 60)} minutes")
        found.append(entry)
    return found


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
