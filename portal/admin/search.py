"""Support's search over organizations, and the front page's filters with their counts.

Every query here is served by an index (migration 0008) and bounded by a page size:
a term is looked up by what it looks like (a Stripe customer or invoice id, a portal
invoice or line number, else a piece of a slug, name, billing email or member's
email: trigram indexes on PostgreSQL), and each filter is a small partial index
(their predicates are written as SQL literals so the planner can match them, also
for prepared statements). Each filter is a query of distinct organization ids.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, and_, func, literal_column, or_, select, text, union

from portal.extensions import db
from portal.models import Invoice, InvoiceItem, Membership, Organization, User
from portal.models.types import utcnow

ORGANIZATIONS_PER_PAGE = 50
MAX_TERM_LENGTH = 200
# An open invoice whose period ended longer ago than this should have been closed.
CYCLE_OVERDUE_AFTER = timedelta(hours=1)


def _sql(*values: str | int) -> list:
    """Values as SQL literals (the partial indexes' predicates must read the same)."""
    return [literal_column(repr(v) if isinstance(v, str) else str(int(v))) for v in values]


def _active(invoice=Invoice):
    return invoice.status.in_(_sql("open", "closing"))


def sync_failing_filter() -> Select:
    """Organizations with an open or closing invoice whose sync is blocked, or whose
    latest finished sync run (not counting runs that found it locked) did not end
    synced or unchanged."""
    failing = select(Invoice.organization_id).where(
        _active(), Invoice.last_sync_outcome.not_in(_sql("synced", "unchanged")))
    blocked = select(Invoice.organization_id).where(Invoice.sync_blocked.is_not(None), _active())
    return union(failing, blocked)


def changes_waiting_filter() -> Select:
    """Organizations whose open or closing invoice has changes not yet at Stripe."""
    return select(Invoice.organization_id).where(Invoice.change_seq > Invoice.synced_seq, _active()).distinct()


def drift_found_filter() -> Select:
    """Organizations whose open or closing invoice differs at Stripe from what the
    portal put there: its last comparison (the drift sweep, or support's "Compare with
    Stripe") found a difference no sync has repaired since, or Stripe finalized the
    draft behind the portal's back (its sync is blocked so)."""
    from portal.billing.drift import drift_found_organizations

    finalized_at_stripe = select(Invoice.organization_id).where(
        Invoice.sync_blocked.is_not(None), Invoice.sync_blocked == "stripe_invoice_finalized", _active())
    return union(drift_found_organizations(), finalized_at_stripe)


def payment_failed_filter() -> Select:
    """Organizations with a finalized invoice whose payment failed or waits for the customer."""
    return select(Invoice.organization_id).where(
        Invoice.status == literal_column("'finalized'"),
        or_(Invoice.payment_attempts > literal_column("0"), Invoice.payment_problem.is_not(None))).distinct()


def cycle_overdue_filter(now: datetime | None = None) -> Select:
    """Organizations with an open or closing invoice whose period ended more than
    CYCLE_OVERDUE_AFTER ago: the close has not happened."""
    cutoff = (now or utcnow()) - CYCLE_OVERDUE_AFTER
    return select(Invoice.organization_id).where(_active(), Invoice.period_end < cutoff).distinct()


def credit_balance_filter() -> Select:
    """Organizations that Stripe owes (negative customer balance) or whose open
    invoice is below zero (credits larger than the charges)."""
    return union(
        select(Organization.id).where(Organization.stripe_balance_cents < literal_column("0")),
        select(Invoice.organization_id).where(Invoice.status == literal_column("'open'"),
                                              Invoice.total_cents < literal_column("0")),
    )


@dataclass(frozen=True)
class Filter:
    name: str
    label: str
    organizations: Callable[[], Select]


FILTERS = {f.name: f for f in (
    Filter("sync_failing", "Sync failing", sync_failing_filter),
    Filter("changes_waiting", "Changes waiting", changes_waiting_filter),
    Filter("drift_found", "Drift found", drift_found_filter),
    Filter("payment_failed", "Payment failed", payment_failed_filter),
    Filter("cycle_overdue", "Cycle overdue", cycle_overdue_filter),
    Filter("credit_balance", "Credit balance", credit_balance_filter),
)}


def filter_counts() -> dict[str, int]:
    """How many organizations each filter finds: one round trip, one indexed count each."""
    columns = [select(func.count()).select_from(f.organizations().subquery()).scalar_subquery().label(name)
               for name, f in FILTERS.items()]
    row = db.session.execute(select(*columns)).one()
    return dict(row._mapping)


def _term_matches(term: str) -> Select:
    """Ids of the organizations `term` names, by what it looks like."""
    if term.startswith("cus_"):
        return select(Organization.id).where(Organization.stripe_customer_id == term)
    if term.startswith("in_"):
        return select(Invoice.organization_id).where(Invoice.stripe_invoice_id == term)
    number = term.removeprefix("#")
    if number.isascii() and number.isdigit() and len(number) <= 18:
        return union(
            select(Invoice.organization_id).where(Invoice.id == int(number)),
            select(Invoice.organization_id).join(InvoiceItem, InvoiceItem.invoice_id == Invoice.id)
            .where(InvoiceItem.id == int(number)),
        )
    members = select(Membership.organization_id).join(User, User.id == Membership.user_id).where(
        User.email.icontains(term, autoescape=True))
    if "@" in term:  # an email: slugs never hold "@", and names are not searched by address
        return union(select(Organization.id).where(Organization.billing_email.icontains(term, autoescape=True)),
                     members)
    return union(
        select(Organization.id).where(or_(Organization.slug.icontains(term, autoescape=True),
                                          Organization.name.icontains(term, autoescape=True),
                                          Organization.billing_email.icontains(term, autoescape=True))),
        members,
    )


@dataclass
class SearchPage:
    rows: list[tuple[Organization, Invoice | None]]
    page: int
    has_next: bool


class SearchError(ValueError):
    """A search that cannot be run (the message says why)."""


def search_organizations(term: str = "", filter_name: str = "", page: int = 1,
                         per_page: int = ORGANIZATIONS_PER_PAGE) -> SearchPage:
    """One page of the organizations matching `term` and the filter, by name, each
    with its open invoice. Raises SearchError for an unknown filter or a page < 1."""
    term = " ".join((term or "").split())
    if len(term) > MAX_TERM_LENGTH:
        raise SearchError(f"the search is longer than {MAX_TERM_LENGTH} characters")
    if filter_name and filter_name not in FILTERS:
        raise SearchError(f"unknown filter {filter_name!r}")
    if page < 1:
        raise SearchError("pages start at 1")
    query = (
        select(Organization, Invoice)
        .outerjoin(Invoice, and_(Invoice.organization_id == Organization.id,
                                 Invoice.status == literal_column("'open'")))
        .order_by(Organization.name, Organization.id)
        .offset((page - 1) * per_page)
        .limit(per_page + 1)
    )
    if term:
        query = query.where(Organization.id.in_(_term_matches(term)))
    if filter_name:
        # The filter's (few) organizations first, then their names: PostgreSQL cannot
        # estimate how few (change_seq > synced_seq, period_end of open invoices) and
        # would otherwise walk every organization by name probing each.
        found = FILTERS[filter_name].organizations().cte("filtered").prefix_with(
            "MATERIALIZED", dialect="postgresql")
        query = query.join(found, found.c[0] == Organization.id)
    with _trigram_indexes_preferred(bool(term)):
        rows = [tuple(row) for row in db.session.execute(query).all()]
    return SearchPage(rows[:per_page], page, len(rows) > per_page)


@contextmanager
def _trigram_indexes_preferred(searching: bool):
    """PostgreSQL prices a trigram index scan for `ILIKE '%term%'` above a sequential
    scan of a table of thousands of rows, and takes ten times longer for it (13 ms
    against 1 ms for 10,000 organizations): for a search, rule the scan out for this
    one statement (SET LOCAL ends with the transaction; RESET gives it back at once)."""
    if not searching or db.session.get_bind().dialect.name != "postgresql":
        yield
        return
    db.session.execute(text("SET LOCAL enable_seqscan = off"))
    try:
        yield
    finally:
        db.session.execute(text("RESET enable_seqscan"))
