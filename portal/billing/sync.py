"""Sync: make one Stripe draft invoice exactly equal to the portal's invoice.

`sync_invoice(invoice_id, trigger)` is safe to run any number of times, from any
number of workers:

1. It holds the invoice's Redis lock (owner, a short lease renewed while it works,
   `portal.locks`), so two runs never have requests in flight for one invoice; a run
   that cannot get it records `locked`. Every Stripe write is fenced: a run that
   lost the lock stops (`lock_lost`) without writing or marking anything synced.
2. It ensures the Stripe customer and the Stripe draft, adopting ones a crashed run
   created (by metadata) instead of creating them twice. The draft is created with
   `auto_advance=true` and `automatically_finalizes_at` a little after the period end
   in the same call (pending items excluded, portal ids in metadata): Stripe
   schedules a finalization only on auto-advancing drafts, and an auto-advancing
   draft without a time is finalized an hour after creation, so the two are never
   sent apart. Every run checks the schedule Stripe reports and repairs it when it
   is missing or no longer matches the period's end (a close that ended the period
   early, an edit in the dashboard). A draft or customer that disappeared at Stripe
   (deleted in the dashboard, another Stripe account) is created again and the run
   goes on; the run's note says so for support.
3. It reads the Stripe invoice and all its lines, matches them to the portal's lines
   (`portal.billing.lines`) by the portal key kept in each line's metadata, and
   adds, updates and removes only what differs, with the bulk line operations in
   chunks of CHUNK_LINES: a few writes per invoice however many lines changed, none
   when nothing differs.
4. Every write is one attempt with an idempotency key of its own, recorded before
   the call (`portal.stripe_gateway`): the same correction needed twice is applied
   twice. A 500 leaves the outcome unknown: the run re-reads Stripe and plans
   again (with new keys). A response Stripe replayed is never taken as the current
   state: the run re-reads the invoice's total before trusting it.
5. It records a SyncRun (trigger, outcome, counts, Stripe calls, duration, error)
   and, when Stripe matches, marks the changes it saw as synced.

No database transaction is held open across a call to Stripe.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import selectinload

from portal.billing.lines import StripeLine, TooManyLines, stripe_lines
from portal.extensions import db
from portal.locks import DEFAULT_WAIT_SECONDS, LockLost, invoice_lock
from portal.metrics import record_sync
from portal.models import Invoice, InvoiceItem, Organization, StripeWrite, SyncRun
from portal.models.types import utcnow
from portal.stripe_gateway import (
    REQUEST_TIMEOUT_SECONDS,
    InvoiceNotEditable,
    OutcomeUnknown,
    StripeFailure,
    StripeGateway,
    StripeNotConfigured,
    StripeObjectMissing,
    StripeRejected,
    StripeUnavailable,
    gateway,
)

CHUNK_LINES = 50
MAX_DESCRIPTION = 500  # Stripe's limit on an invoice item's description
MAX_RECONCILE_ROUNDS = 3
# Stripe finalizes the draft on its own this long after the period ends, should the
# portal's own end-of-cycle close never run.
AUTO_FINALIZE_GRACE = timedelta(hours=2)
SYNCABLE_STATUSES = ("open", "closing")


@dataclass
class Plan:
    adds: list[StripeLine] = field(default_factory=list)
    updates: list[tuple[str, StripeLine]] = field(default_factory=list)
    removes: list[str] = field(default_factory=list)
    unchanged: int = 0
    foreign_total: int = 0  # lines on the Stripe invoice that the portal did not make

    @property
    def empty(self) -> bool:
        return not (self.adds or self.updates or self.removes)


class SyncStopped(Exception):
    """The run ends with a named outcome that is not a crash."""

    def __init__(self, outcome: str, detail: str = ""):
        super().__init__(detail or outcome)
        self.outcome = outcome


def plan_changes(invoice_id: int, desired: list[StripeLine], current: list) -> Plan:
    """What to add, update and remove so that `current` (Stripe's lines) equals `desired`."""
    plan, ours = Plan(), {}
    for line in current:
        metadata = _metadata(line)
        key = metadata.get("portal_line")
        if key is None or metadata.get("portal_invoice") != str(invoice_id):
            plan.foreign_total += line.amount
            continue
        if key in ours:
            plan.removes.append(line.id)  # a duplicate: keep one
        else:
            ours[key] = line
    for line in desired:
        existing = ours.pop(line.key, None)
        if existing is None:
            plan.adds.append(line)
        elif existing.amount != line.amount_cents or existing.description != _stripe_description(line):
            plan.updates.append((existing.id, line))
        else:
            plan.unchanged += 1
    plan.removes.extend(line.id for line in ours.values())
    return plan


def _schedule_ok(draft, period_end: datetime) -> bool:
    """The draft finalizes on its own, and not before the period's end (plus grace) nor
    later than that counted from now (a period that ended early moves it earlier)."""
    when = getattr(draft, "automatically_finalizes_at", None)
    if not getattr(draft, "auto_advance", False) or not when:
        return False
    grace, now = AUTO_FINALIZE_GRACE.total_seconds(), utcnow().timestamp()
    earliest = int(period_end.timestamp() + grace)  # as _finalizes_at() rounds
    latest = max(earliest, int(now + grace))
    return (when >= earliest or earliest <= now) and when <= latest + 1


def _test_payment_method() -> str | None:
    """STRIPE_TEST_PAYMENT_METHOD, only ever with a test-mode key."""
    from flask import current_app

    method = current_app.config.get("STRIPE_TEST_PAYMENT_METHOD")
    if method and not str(current_app.config.get("STRIPE_API_KEY") or "").startswith(("sk_test_", "rk_test_")):
        raise StripeNotConfigured("STRIPE_TEST_PAYMENT_METHOD is only allowed with a Stripe test-mode key")
    return method


def _metadata(stripe_object) -> dict:
    metadata = getattr(stripe_object, "metadata", None)
    return metadata.to_dict() if metadata is not None else {}


def _chunks(items: list, size: int = CHUNK_LINES):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _stripe_description(line: StripeLine) -> str:
    """The description as Stripe keeps it (at most 500 characters)."""
    return line.description[:MAX_DESCRIPTION]


def _line_params(invoice: Invoice, line: StripeLine) -> dict:
    return {
        "amount": line.amount_cents,
        "description": _stripe_description(line),
        "metadata": {"portal_invoice": str(invoice.id), "portal_line": line.key},
    }


class _Run:
    """One sync of one invoice. Holds the counts that end up in its SyncRun."""

    def __init__(self, invoice: Invoice, stripe: StripeGateway):
        self.invoice = invoice
        self.organization: Organization = invoice.organization
        self.stripe = stripe
        self.counts = {"created": 0, "updated": 0, "deleted": 0, "unchanged": 0}

        self.notes: list[str] = []

    def execute(self) -> str:
        seq = self.invoice.change_seq
        desired = stripe_lines(self.invoice.items)
        db.session.commit()  # nothing held open while we talk to Stripe
        self._ensure_customer()
        fresh = self._ensure_draft()
        for round_ in range(MAX_RECONCILE_ROUNDS):
            if fresh and round_ == 0:
                current = []  # created by this run: it has no lines yet
            else:
                fresh = self._check_draft()
                current = [] if fresh else self.stripe.invoice_lines(self.invoice.stripe_invoice_id)
            plan = plan_changes(self.invoice.id, desired, current)
            self.counts["unchanged"] = plan.unchanged
            try:
                stripe_total = self._apply(plan)
            except OutcomeUnknown:
                continue  # read Stripe again and plan anew
            if stripe_total is None and plan.empty:
                stripe_total = sum(line.amount for line in current)
            elif stripe_total is None:  # a replayed answer: read what Stripe holds now
                stripe_total = self.stripe.retrieve_invoice(self.invoice.stripe_invoice_id).total
            expected = sum(line.amount_cents for line in desired) + plan.foreign_total
            if stripe_total != expected:
                raise SyncStopped("total_mismatch", f"Stripe total {stripe_total} != portal total {expected}")
            self._fence()  # a run that lost the lock claims nothing
            self._mark_synced(seq)
            return "synced" if self.stripe.counts.writes else "unchanged"
        raise SyncStopped("unknown_outcome", f"writes answered 500 in {MAX_RECONCILE_ROUNDS} rounds")

    # --- Stripe objects ------------------------------------------------------------

    def _ensure_customer(self, replacing: str | None = None) -> None:
        """Make sure the organization has a Stripe customer; `replacing` names one that
        was deleted at Stripe and must be created again."""
        organization = self.organization
        if organization.stripe_customer_id and organization.stripe_customer_id != replacing:
            return
        # A run that crashed after creating the customer left it behind: adopt it.
        for customer in self.stripe.customers_by_email(organization.billing_email):
            if customer.id != replacing and _metadata(customer).get("portal_organization_id") == str(organization.id):
                self._claim_customer(customer.id, replacing)
                return
        params = {
            "name": organization.name,
            "email": organization.billing_email,
            "metadata": {"portal_organization_id": str(organization.id), "portal_slug": organization.slug},
        }
        test_method = _test_payment_method()
        if test_method:
            params["payment_method"] = test_method
            params["invoice_settings"] = {"default_payment_method": test_method}
        customer = self.stripe.create_customer(params, organization=organization.id)
        if not self._claim_customer(customer.id, replacing):
            return
        from portal.billing.customers import apply_stripe_customer

        apply_stripe_customer(organization.id, customer, seen_at=None)

    def _ensure_draft(self, replacing: str | None = None) -> bool:
        """Make sure the Stripe draft exists; True if this run created it. `replacing`
        names a draft Stripe lost (deleted, or its customer deleted): it is created again."""
        invoice = self.invoice
        if invoice.stripe_invoice_id and invoice.stripe_invoice_id != replacing:
            return False
        # A run that crashed after creating the draft left it behind: adopt it.
        for draft in self.stripe.draft_invoices_of(self.organization.stripe_customer_id):
            if draft.id != replacing and _metadata(draft).get("portal_invoice_id") == str(invoice.id):
                self._claim_draft(draft.id, replacing)
                return False
        finalizes_at = self._finalizes_at()
        params = {
            "customer": self.organization.stripe_customer_id,
            # Both in one call: Stripe schedules a finalization only on an auto-advancing
            # draft, and finalizes one without a time an hour after creating it.
            "auto_advance": True,
            "automatically_finalizes_at": finalizes_at,
            "collection_method": "charge_automatically",
            "pending_invoice_items_behavior": "exclude",
            "currency": invoice.currency,
            "description": f"{self.organization.name}: usage from {invoice.period_start:%Y-%m-%d} "
                           f"to {invoice.period_end:%Y-%m-%d}",
            "metadata": {
                "portal_invoice_id": str(invoice.id),
                "portal_organization_id": str(self.organization.id),
                "period_start": invoice.period_start.isoformat(),
                "period_end": invoice.period_end.isoformat(),
            },
        }
        try:
            draft = self.stripe.create_invoice(params, invoice=invoice.id)
        except StripeObjectMissing as missing:
            if "customer" not in str(missing).lower():
                raise
            # The customer is gone too (deleted, or another Stripe account's key).
            lost = self.organization.stripe_customer_id
            self.notes.append(f"Stripe customer {lost} does not exist at Stripe; created it again")
            self._ensure_customer(replacing=lost)
            params["customer"] = self.organization.stripe_customer_id
            draft = self.stripe.create_invoice(params, invoice=invoice.id)
        self._claim_draft(draft.id, replacing)
        if not _schedule_ok(draft, invoice.period_end):
            self._set_schedule(draft.id, "Stripe created the draft without its finalization schedule")
        return True

    def _claim_customer(self, customer_id: str, replacing: str | None) -> bool:
        """Save the organization's Stripe customer (see `_claim`). False, with the
        winner's id loaded, when another run (of the organization's other invoice)
        claimed one first: the one this run made is left unused."""
        if self._claim(self.organization, Organization.stripe_customer_id, customer_id, replacing):
            return True
        self.notes.append(f"Stripe customer {customer_id} was left unused: another run had claimed "
                          f"{self.organization.stripe_customer_id} for the organization")
        return False

    def _claim_draft(self, draft_id: str, replacing: str | None) -> None:
        """Save the invoice's Stripe draft (see `_claim`); another run's claim means
        the lock is lost."""
        if not self._claim(self.invoice, Invoice.stripe_invoice_id, draft_id, replacing):
            raise LockLost(f"invoice {self.invoice.id} got Stripe draft {self.invoice.stripe_invoice_id} from "
                           f"another run while this one created {draft_id}")

    def _claim(self, row, column, stripe_id: str, replacing: str | None) -> bool:
        """Save a Stripe id on `row` only while the lock is still ours (a run that lost
        it leaves what it created unclaimed: the holder adopts it by metadata or makes
        its own) and only over no id or the one being replaced: the first claim wins.
        True if `row` now holds `stripe_id`; `row` is reloaded either way."""
        model = type(row)
        self._fence()
        claimed = db.session.execute(
            update(model).where(model.id == row.id, or_(column.is_(None), column == replacing))
            .values({column.key: stripe_id}).execution_options(synchronize_session=False)
        ).rowcount
        db.session.commit()
        db.session.refresh(row)
        return bool(claimed) or getattr(row, column.key) == stripe_id

    def _fence(self) -> None:
        if self.stripe.fence is not None:
            self.stripe.fence()  # LockLost: claim nothing

    def _finalizes_at(self) -> int:
        """When Stripe is to finalize the draft should the portal's close never run: a
        little after the period's end, and never sooner than that from now."""
        return int(max(self.invoice.period_end, utcnow()).timestamp() + AUTO_FINALIZE_GRACE.total_seconds())

    def _set_schedule(self, stripe_id: str, why: str) -> None:
        """Give the draft `auto_advance=true` and its finalization time, always together."""
        finalizes_at = self._finalizes_at()
        params = {"auto_advance": True, "automatically_finalizes_at": finalizes_at}
        draft = self.stripe.update_invoice(stripe_id, params, invoice=self.invoice.id)
        if not (draft.auto_advance and draft.automatically_finalizes_at == finalizes_at):
            raise SyncStopped("schedule_not_set", f"{why}; Stripe did not take auto_advance with "
                                                  f"automatically_finalizes_at={finalizes_at}")
        self.notes.append(f"{why}: finalization scheduled for {finalizes_at}")

    def _check_draft(self) -> bool:
        """Read the Stripe draft: create it again if Stripe lost it (True: it has no lines
        yet), stop if it is no longer a draft, repair its finalization schedule."""
        stripe_id = self.invoice.stripe_invoice_id
        try:
            draft = self.stripe.retrieve_invoice(stripe_id, expand=["customer"])
        except StripeObjectMissing:
            draft = None
        if draft is None or getattr(draft, "deleted", False):
            self.notes.append(f"Stripe draft {stripe_id} was deleted at Stripe; created it again")
            return self._ensure_draft(replacing=stripe_id)
        if draft.status != "draft":
            # Finalized (or voided): it bills what it bills, whatever became of its
            # customer since; the end-of-cycle logic takes over. Never a second one.
            raise SyncStopped("stripe_invoice_finalized", f"Stripe invoice is {draft.status}")
        customer = draft.customer
        if getattr(customer, "deleted", False):
            self.notes.append(f"Stripe customer {customer.id} was deleted at Stripe; created it again "
                              f"with a new draft in place of {stripe_id}")
            self._ensure_customer(replacing=customer.id)
            return self._ensure_draft(replacing=stripe_id)
        if not _schedule_ok(draft, self.invoice.period_end):
            self._set_schedule(stripe_id, "The draft's finalization schedule was missing or out of date")
        return False

    # --- writes --------------------------------------------------------------------

    def _apply(self, plan: Plan) -> int | None:
        """Apply the plan (removals first, to make room under Stripe's limit);
        returns the Stripe invoice total after the last write, or None if there was
        no write or an answer was replayed (then only a fresh read tells)."""
        invoice, stripe_id, total, replayed = self.invoice, self.invoice.stripe_invoice_id, None, False
        try:
            for chunk in _chunks(plan.removes):
                result = self.stripe.remove_lines(stripe_id, chunk, invoice=invoice.id)
                self.counts["deleted"] += len(chunk)
                total, replayed = result.total, replayed or self.stripe.last_write_replayed
            for chunk in _chunks(plan.updates):
                lines = [{"id": line_id, **_line_params(invoice, line)} for line_id, line in chunk]
                result = self.stripe.update_lines(stripe_id, lines, invoice=invoice.id)
                self.counts["updated"] += len(chunk)
                total, replayed = result.total, replayed or self.stripe.last_write_replayed
            for chunk in _chunks(plan.adds):
                lines = [_line_params(invoice, line) for line in chunk]
                result = self.stripe.add_lines(stripe_id, lines, invoice=invoice.id)
                self.counts["created"] += len(chunk)
                total, replayed = result.total, replayed or self.stripe.last_write_replayed
        except InvoiceNotEditable:
            self._check_draft()  # says why: finalized (or deleted) meanwhile
            raise
        return None if replayed else total

    # --- bookkeeping ---------------------------------------------------------------

    def _mark_synced(self, seq: int) -> None:
        db.session.execute(
            update(Invoice).where(Invoice.id == self.invoice.id, Invoice.synced_seq < seq)
            .values(synced_seq=seq).execution_options(synchronize_session=False)
        )
        db.session.commit()


def _load(invoice_id: int) -> Invoice | None:
    return db.session.scalar(
        select(Invoice).where(Invoice.id == invoice_id)
        .options(selectinload(Invoice.items).joinedload(InvoiceItem.product),
                 selectinload(Invoice.organization))
        .execution_options(populate_existing=True)
    )


def sync_invoice(invoice_id: int, trigger: str = "manual", job_id: str | None = None,
                 stripe: StripeGateway | None = None, wait_seconds: float = DEFAULT_WAIT_SECONDS) -> SyncRun:
    """Make the Stripe draft equal to the portal invoice; returns the SyncRun recorded.
    Safe to run twice or concurrently (see the module docstring). Finding the invoice
    locked for `wait_seconds` (jobs wait none) ends the run as `locked`."""
    record = SyncRun(invoice_id=invoice_id, trigger=trigger, job_id=job_id, started_at=utcnow())
    session = db.session()
    # Values read stay readable after each commit without a new query: a transaction
    # must not be open while we wait on Stripe (on SQLite it would hold the write lock).
    expire_on_commit, session.expire_on_commit = session.expire_on_commit, False
    try:
        return _sync_locked(invoice_id, record, stripe, wait_seconds)
    finally:
        session.expire_on_commit = expire_on_commit


def _sync_locked(invoice_id: int, record: SyncRun, stripe: StripeGateway | None,
                 wait_seconds: float) -> SyncRun:
    with invoice_lock(invoice_id, wait_seconds) as lock:
        if lock is None:
            return _finish(record, "locked", None)
        invoice = _load(invoice_id)
        if invoice is None:
            raise LookupError(f"no invoice {invoice_id}")
        # We hold the lock: a run of this invoice still without an outcome died (its
        # process was killed) and will never record one.
        died = db.session.execute(
            update(SyncRun).where(SyncRun.invoice_id == invoice_id, SyncRun.finished_at.is_(None))
            .values(outcome="died", finished_at=utcnow(),
                    error="its process ended before the run finished (killed, or its machine lost)")
            .execution_options(synchronize_session=False))
        if died.rowcount:
            db.session.execute(update(Invoice).where(Invoice.id == invoice_id).values(last_sync_outcome="died")
                               .execution_options(synchronize_session=False))
        db.session.add(record)
        db.session.commit()
        if invoice.status not in SYNCABLE_STATUSES:
            return _finish(record, "not_open", f"the invoice is {invoice.status}")
        if invoice.sync_blocked:
            return _finish(record, "blocked", invoice.sync_blocked)
        pending = _write_in_flight(invoice)
        if pending is not None:
            # A write an earlier run sent got no answer and may still land (its run lost
            # the lock mid-call: Redis lost the key, or it was frozen past its lease).
            # Reading and writing now could add what that write adds: wait it out.
            return _finish(record, "write_in_flight",
                           f"{pending.operation} {pending.idempotency_key} sent {pending.started_at:%H:%M:%S} got no "
                           f"answer; syncing again once it has settled ({WRITE_SETTLE_SECONDS} s)")
        try:
            stripe = stripe or gateway()
        except StripeNotConfigured as error:
            return _finish(record, "stripe_not_configured", str(error))
        stripe.fence = lock.check
        try:
            return _run_once(invoice, invoice_id, record, stripe)
        finally:
            stripe.fence = None
            if stripe.write_in_flight:
                lock.abandon()  # no one syncs this invoice until that write has landed


def _run_once(invoice: Invoice, invoice_id: int, record: SyncRun, stripe: StripeGateway) -> SyncRun:
    run = _Run(invoice, stripe)
    try:
        outcome, error = run.execute(), None
    except SyncStopped as stop:
        outcome, error = stop.outcome, str(stop)
        if stop.outcome == "stripe_invoice_finalized":
            _block(invoice_id, stop.outcome)
    except LockLost as lost:
        outcome, error = "lock_lost", str(lost)
    except StripeUnavailable as failure:
        outcome, error = "stripe_unavailable", str(failure)
    except OutcomeUnknown as failure:  # creating the customer or draft, or the schedule
        outcome, error = "unknown_outcome", str(failure)
    except (StripeRejected, InvoiceNotEditable, StripeObjectMissing, StripeFailure) as failure:
        outcome, error = "rejected", str(failure)
    except TooManyLines as failure:
        outcome, error = "too_many_lines", str(failure)
    except Exception:
        _finish(record, "error", traceback.format_exc(limit=5), stripe, run.counts, run.notes)
        raise
    return _finish(record, outcome, error, stripe, run.counts, run.notes)


# A write sent with no answer can land this long after its try left (the request
# timeout, and a margin); until then no new run of its invoice reads and writes.
WRITE_SETTLE_SECONDS = REQUEST_TIMEOUT_SECONDS + 5


def _write_in_flight(invoice: Invoice) -> StripeWrite | None:
    """An unanswered write younger than WRITE_SETTLE_SECONDS to this invoice's draft,
    or to its organization's customer (creating one: a second could be created)."""
    return db.session.scalar(
        select(StripeWrite).where(
            or_(StripeWrite.invoice_id == invoice.id,
                (StripeWrite.organization_id == invoice.organization_id) & StripeWrite.invoice_id.is_(None)
                & (StripeWrite.operation == "create_customer")),
            or_(StripeWrite.outcome.is_(None), StripeWrite.outcome == "no_answer"),
            StripeWrite.started_at > utcnow() - timedelta(seconds=WRITE_SETTLE_SECONDS),
        ).order_by(StripeWrite.started_at.desc()).limit(1)
    )


def _block(invoice_id: int, reason: str) -> None:
    """Stop sweeping this invoice; the end-of-cycle logic (or support) takes over."""
    db.session.rollback()
    db.session.execute(update(Invoice).where(Invoice.id == invoice_id).values(sync_blocked=reason))
    db.session.commit()


def _finish(record: SyncRun, outcome: str, error: str | None, stripe: StripeGateway | None = None,
            counts: dict | None = None, notes: list[str] | None = None) -> SyncRun:
    db.session.rollback()  # whatever a failed step left half-done is not ours to keep
    record = db.session.merge(record)
    record.outcome = outcome
    record.error = error
    record.note = "; ".join(notes) if notes else None
    record.finished_at = utcnow()
    for name, value in (counts or {}).items():
        setattr(record, name, value)
    if stripe is not None:
        record.stripe_reads, record.stripe_writes = stripe.counts.reads, stripe.counts.writes
    db.session.add(record)
    if outcome != "locked":  # a run that found the lock taken did nothing: the holder's run tells
        db.session.execute(update(Invoice).where(Invoice.id == record.invoice_id)
                           .values(last_sync_outcome=outcome).execution_options(synchronize_session=False))
    db.session.commit()
    record_sync(outcome, (record.finished_at - record.started_at).total_seconds())
    return record


def unsynced_invoice_ids(limit: int | None = None) -> list[int]:
    """Invoices with changes not yet at Stripe (what the periodic sweep syncs)."""
    query = (
        select(Invoice.id)
        .where(Invoice.change_seq > Invoice.synced_seq, Invoice.sync_blocked.is_(None),
               Invoice.status.in_(SYNCABLE_STATUSES))
        .order_by(Invoice.id)
    )
    if limit:
        query = query.limit(limit)
    return list(db.session.scalars(query))
