"""Drift: where a Stripe draft differs from the portal's invoice, line by line.

`compare_invoice(invoice_id)` reads the Stripe draft and its lines (through the
gateway, so every read is spent from the shared request budget) and lines them up
with the lines the sync would send (`portal.billing.lines`), matched as the sync
matches them, by the portal key in each line's metadata:

- `missing`: a portal line Stripe does not have (the sync adds it);
- `extra`: a line carrying this invoice's portal metadata that the portal no longer
  has, or a second copy of one (the sync removes it);
- `different`: amount, quantity or description differ (the sync updates it; the
  quantity travels in the description, as the customer reads it on Stripe's invoice);
- `by_hand`: a line without the portal's metadata, added in Stripe's dashboard. The
  sync keeps it and never counts it as the portal's: shown, never "repaired".

A draft or customer deleted at Stripe, or a draft Stripe finalized, is an outcome of
its own; the sync (`portal.billing.sync`) already recovers from the first two.

The comparison holds the invoice's lock while it reads, so it never sees a sync half
way through its writes; finding the invoice locked ends it as `busy`. It writes
nothing to Stripe. `record_check` keeps the latest result per invoice (`DriftCheck`).

`sweep_drift(batch)` compares a bounded number of open invoices per run, going on
from a cursor kept in the database and wrapping around, so every open invoice is
visited in turn however many there are. Invoices with changes waiting for their sync
(they differ from Stripe by design), blocked ones and busy ones are passed over.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload

from portal.billing.lines import StripeLine, stripe_lines
from portal.billing.sync import SYNCABLE_STATUSES, _metadata, _stripe_description
from portal.extensions import db
from portal.locks import invoice_lock
from portal.models import DriftCheck, DriftSweepCursor, Invoice, InvoiceItem, SyncRun
from portal.models.types import utcnow
from portal.stripe_gateway import StripeFailure, StripeGateway, StripeObjectMissing, gateway

# Outcomes that need a look from support (a clean draft with hand-added lines does not).
PROBLEM_OUTCOMES = ("drift", "draft_missing", "customer_missing", "not_draft")
# A page answers in seconds even when Stripe does not: two tries per read, not six.
INTERACTIVE_ATTEMPTS = 2
INTERACTIVE_WAIT_SECONDS = 2.0
DEFAULT_SWEEP_BATCH = 20


class NotComparable(Exception):
    """The invoice has no Stripe draft to compare with (closed, or never synced)."""


@dataclass
class LineDifference:
    kind: str  # missing | extra | different | by_hand
    changes: list[str] = field(default_factory=list)  # for `different`: amount, quantity, description
    key: str | None = None
    portal_description: str | None = None
    portal_amount: int | None = None
    stripe_line_id: str | None = None
    stripe_item_id: str | None = None
    stripe_description: str | None = None
    stripe_amount: int | None = None
    stripe_quantity: int | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Comparison:
    invoice_id: int
    outcome: str  # a DriftCheck outcome, or `busy`
    stripe_invoice_id: str | None = None
    differences: list[LineDifference] = field(default_factory=list)
    portal_total_cents: int | None = None
    stripe_total_cents: int | None = None
    changes_waiting: bool = False
    error: str | None = None

    def count(self, kind: str) -> int:
        return sum(1 for difference in self.differences if difference.kind == kind)


def _split_quantity(description: str | None) -> tuple[str, str]:
    """("Egress", "12.5 GB") from "Egress: 12.5 GB" (how `lines` writes a line)."""
    label, sep, quantity = (description or "").rpartition(": ")
    return (label, quantity) if sep else (description or "", "")


def _changes(desired: StripeLine, line) -> list[str]:
    changes = []
    if line.amount != desired.amount_cents:
        changes.append("amount")
    wanted = _stripe_description(desired)
    if (line.description or "") != wanted:
        (label, quantity), (stripe_label, stripe_quantity) = _split_quantity(wanted), _split_quantity(line.description)
        if label == stripe_label and quantity != stripe_quantity:
            changes.append("quantity")
        else:
            changes.append("description")
    return changes


def _stripe_side(line) -> dict:
    parent = getattr(line, "parent", None)
    details = getattr(parent, "invoice_item_details", None) if parent is not None else None
    return {"stripe_line_id": line.id, "stripe_description": line.description, "stripe_amount": line.amount,
            "stripe_quantity": getattr(line, "quantity", None),
            "stripe_item_id": getattr(details, "invoice_item", None) if details is not None else None}


def line_differences(invoice_id: int, desired: list[StripeLine], current: list) -> list[LineDifference]:
    """The lines of `current` (Stripe's) and `desired` (the portal's) that differ, in
    the portal's order, then Stripe's extra and hand-added lines. Matches lines the
    way `sync.plan_changes` does, so what it reports is what a sync repairs."""
    ours: dict[str, object] = {}
    extra: list[LineDifference] = []
    by_hand: list[LineDifference] = []
    for line in current:
        metadata = _metadata(line)
        key = metadata.get("portal_line")
        if key is None or metadata.get("portal_invoice") != str(invoice_id):
            by_hand.append(LineDifference("by_hand", **_stripe_side(line)))
        elif key in ours:
            extra.append(LineDifference("extra", ["duplicate"], key=key, **_stripe_side(line)))
        else:
            ours[key] = line
    found = []
    for wanted in desired:
        line = ours.pop(wanted.key, None)
        portal = {"key": wanted.key, "portal_description": _stripe_description(wanted),
                  "portal_amount": wanted.amount_cents}
        if line is None:
            found.append(LineDifference("missing", **portal))
        elif changes := _changes(wanted, line):
            found.append(LineDifference("different", changes, **portal, **_stripe_side(line)))
    extra = [LineDifference("extra", ["not in the portal"], key=key, **_stripe_side(line))
             for key, line in ours.items()] + extra
    return found + extra + by_hand


def _load(invoice_id: int) -> Invoice | None:
    return db.session.scalar(
        select(Invoice).where(Invoice.id == invoice_id)
        .options(selectinload(Invoice.items).joinedload(InvoiceItem.product))
        .execution_options(populate_existing=True)
    )


def compare_invoice(invoice_id: int, stripe: StripeGateway | None = None,
                    wait_seconds: float = INTERACTIVE_WAIT_SECONDS) -> Comparison:
    """Compare the invoice with its Stripe draft (reads only). NotComparable when it
    has none; outcome `busy` when a sync held its lock for `wait_seconds`."""
    invoice = _load(invoice_id)
    if invoice is None:
        raise LookupError(f"no invoice {invoice_id}")
    if invoice.status not in SYNCABLE_STATUSES:
        raise NotComparable(f"invoice #{invoice_id} is {invoice.status}: only an open or closing invoice "
                            "has a Stripe draft to compare with")
    if not invoice.stripe_invoice_id:
        raise NotComparable(f"invoice #{invoice_id} has no Stripe draft yet: its first sync creates it")
    db.session.commit()  # no transaction held while we wait for the lock or for Stripe
    with invoice_lock(invoice_id, wait_seconds) as lock:
        if lock is None:
            return Comparison(invoice_id, "busy", error="a sync of this invoice is running; compare again shortly")
        invoice = _load(invoice_id)  # as the sync that held the lock left it
        comparison = Comparison(invoice_id, "clean", invoice.stripe_invoice_id,
                                portal_total_cents=invoice.total_cents,
                                changes_waiting=invoice.has_unsynced_changes)
        desired = stripe_lines(invoice.items)
        db.session.commit()
        try:
            _read_stripe(comparison, desired, stripe or gateway())
        except StripeFailure as failure:
            comparison.outcome, comparison.error = "error", f"{type(failure).__name__}: {failure}"
        return comparison


def _read_stripe(comparison: Comparison, desired: list[StripeLine], stripe: StripeGateway) -> None:
    stripe_id = comparison.stripe_invoice_id
    try:
        draft = stripe.retrieve_invoice(stripe_id, expand=["customer"])
    except StripeObjectMissing:
        draft = None
    if draft is None or getattr(draft, "deleted", False):
        comparison.outcome, comparison.error = "draft_missing", f"Stripe has no invoice {stripe_id} (deleted)"
        return
    customer = draft.customer
    if getattr(customer, "deleted", False):
        comparison.outcome = "customer_missing"
        comparison.error = f"Stripe customer {customer.id} was deleted, and its draft {stripe_id} with it"
        return
    comparison.stripe_total_cents = draft.total
    if draft.status != "draft":
        comparison.outcome, comparison.error = "not_draft", f"Stripe invoice {stripe_id} is {draft.status}"
        return
    comparison.differences = line_differences(comparison.invoice_id, desired, stripe.invoice_lines(stripe_id))
    if any(difference.kind != "by_hand" for difference in comparison.differences):
        comparison.outcome = "drift"


def interactive_gateway() -> StripeGateway:
    """A gateway for a support page: the shared budget, fewer tries."""
    stripe = gateway()
    stripe.max_attempts = INTERACTIVE_ATTEMPTS
    return stripe


def record_check(comparison: Comparison, source: str) -> DriftCheck | None:
    """Keep the comparison as the invoice's latest check (one row per invoice, replaced);
    a `busy` comparison found nothing and replaces nothing. The caller commits."""
    if comparison.outcome == "busy":
        return None
    values = {
        "checked_at": utcnow(), "source": source, "outcome": comparison.outcome,
        "stripe_invoice_id": comparison.stripe_invoice_id,
        "missing": comparison.count("missing"), "extra": comparison.count("extra"),
        "different": comparison.count("different"), "by_hand": comparison.count("by_hand"),
        "portal_total_cents": comparison.portal_total_cents, "stripe_total_cents": comparison.stripe_total_cents,
        "details": [difference.as_dict() for difference in comparison.differences], "error": comparison.error,
    }
    latest = select(DriftCheck).where(DriftCheck.invoice_id == comparison.invoice_id).with_for_update()
    check = db.session.scalar(latest)
    if check is None:
        try:
            with db.session.begin_nested():  # a check of the same invoice may insert first
                check = DriftCheck(invoice_id=comparison.invoice_id, **values)
                db.session.add(check)
            return check
        except IntegrityError:
            check = db.session.scalar(latest)
            if check is None:  # not the race on the invoice's row: a real error
                raise
    for name, value in values.items():
        setattr(check, name, value)
    return check


# --- what support sees -----------------------------------------------------------------


def _last_good_sync_finished():
    return (select(func.max(SyncRun.finished_at))
            .where(SyncRun.invoice_id == DriftCheck.invoice_id, SyncRun.outcome.in_(("synced", "unchanged")))
            .correlate(DriftCheck).scalar_subquery())


def _standing_problem():
    """Checks that found a problem which no successful sync has repaired since."""
    repaired_since = _last_good_sync_finished()
    return and_(DriftCheck.outcome.in_(PROBLEM_OUTCOMES),
                or_(repaired_since.is_(None), repaired_since < DriftCheck.checked_at))


def drift_found(limit: int = 20) -> list[DriftCheck]:
    """Open and closing invoices whose latest check found drift (or a deleted draft or
    customer) that no successful sync has repaired since, newest first."""
    return list(db.session.scalars(
        select(DriftCheck).join(Invoice, Invoice.id == DriftCheck.invoice_id)
        .where(Invoice.status.in_(SYNCABLE_STATUSES), _standing_problem())
        .options(selectinload(DriftCheck.invoice).joinedload(Invoice.organization))
        .order_by(DriftCheck.checked_at.desc(), DriftCheck.id.desc()).limit(limit)
    ))


def drift_found_organizations():
    """A select of the organizations with such an invoice (for support's filter)."""
    return (select(Invoice.organization_id).select_from(DriftCheck)
            .join(Invoice, Invoice.id == DriftCheck.invoice_id)
            .where(Invoice.status.in_(SYNCABLE_STATUSES), _standing_problem()))


def drift_found_count() -> int:
    return db.session.scalar(
        select(func.count()).select_from(DriftCheck).join(Invoice, Invoice.id == DriftCheck.invoice_id)
        .where(Invoice.status.in_(SYNCABLE_STATUSES), _standing_problem())
    )


def latest_check(invoice_id: int) -> DriftCheck | None:
    return db.session.scalar(select(DriftCheck).where(DriftCheck.invoice_id == invoice_id))


def last_sweep_at() -> datetime | None:
    return db.session.scalar(select(DriftSweepCursor.updated_at).where(DriftSweepCursor.id == 1))


# --- the periodic sweep ------------------------------------------------------------------


def _advance_cursor(batch: int) -> list[int]:
    """The next `batch` open or closing invoices with a Stripe draft after the cursor
    (wrapping around to the lowest ids), and the cursor moved past them."""
    cursor = db.session.get(DriftSweepCursor, 1, with_for_update=True)
    if cursor is None:
        cursor = DriftSweepCursor(id=1, last_invoice_id=0)
        db.session.add(cursor)
    comparable = select(Invoice.id).where(Invoice.status.in_(SYNCABLE_STATUSES),
                                          Invoice.stripe_invoice_id.is_not(None)).order_by(Invoice.id)
    ids = list(db.session.scalars(comparable.where(Invoice.id > cursor.last_invoice_id).limit(batch)))
    if len(ids) < batch:  # the end of the line: go on from the start
        ids += [i for i in db.session.scalars(comparable.where(Invoice.id <= cursor.last_invoice_id)
                                                .limit(batch - len(ids)))]
    if ids:
        cursor.last_invoice_id = ids[-1]
    cursor.updated_at = utcnow()
    db.session.commit()
    return ids


def sweep_drift(batch: int = DEFAULT_SWEEP_BATCH, stripe: StripeGateway | None = None) -> dict:
    """Compare the next `batch` open invoices with Stripe and record what each shows.
    Returns counts per outcome (and `skipped`: changes waiting, blocked, or busy).
    Safe to run twice or concurrently: each check replaces the invoice's last one."""
    from portal.billing.sync_queue import enqueue_sync

    report: dict[str, int] = {"visited": 0, "skipped": 0}
    ids = _advance_cursor(batch)
    stripe = stripe or gateway()
    for invoice_id in ids:
        report["visited"] += 1
        invoice = db.session.get(Invoice, invoice_id, populate_existing=True)
        if invoice is None or invoice.has_unsynced_changes or invoice.sync_blocked:
            db.session.commit()
            report["skipped"] += 1
            continue
        seq = invoice.change_seq
        db.session.commit()
        try:
            comparison = compare_invoice(invoice_id, stripe, wait_seconds=0)
        except NotComparable:  # closed meanwhile
            report["skipped"] += 1
            continue
        if comparison.outcome == "busy":
            report["skipped"] += 1
            continue
        record_check(comparison, "sweep")
        changed = db.session.scalar(select(Invoice.change_seq).where(Invoice.id == invoice_id)) != seq
        db.session.commit()
        if changed:  # a sync asked for while we held the lock found it taken: ask again
            enqueue_sync(invoice_id, trigger="schedule")
        report[comparison.outcome] = report.get(comparison.outcome, 0) + 1
    return report
