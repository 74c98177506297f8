"""Recovery: one named, explained, confirmed and audited action for every state in
which an invoice can stop on its way to being billed.

The states, as the code can reach them:

- **Stripe draft missing** (deleted in the dashboard): the sync creates it again with
  every line (`sync._check_draft`); "Recreate the Stripe draft" runs that sync now
  (for a closing invoice, the close: its final sync, then the finalize).
- **Stripe customer missing** (deleted, or another Stripe account's key): the same
  sync creates the customer and a new draft; "Recreate the Stripe customer" runs it
  for each of the organization's open and closing invoices.
- **Sync blocked** (`Invoice.sync_blocked`: Stripe finalized the draft behind the
  portal's back and the job that applies Stripe's state was lost): "Clear the block"
  lets the sync run again, which re-reads Stripe and finalizes the portal's invoice
  (or, if Stripe still has a draft, brings it in step).
- **Close stopped** (`closing`, or an open invoice whose period ended, whose close
  failed: Stripe down, `unknown_outcome` writes, a finalize refused): "Retry the close".
- **Last sync failed** (`unknown_outcome`, `rejected`, `stripe_unavailable`, ...):
  "Retry the sync".
- **Stripe event not processed** (its handler failed, perhaps past the sweep's
  attempts): "Reprocess the Stripe event".
- **Failed job** (in an RQ failed job registry): "Requeue the job".

Each action checks that it applies (ActionRefused otherwise, nothing changed), needs
a reason, writes one audit entry and commits before it enqueues (the database is the
truth; a lost enqueue is recorded and the periodic sweeps catch up). None calls
Stripe: workers do.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from flask import abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from redis.exceptions import RedisError
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from sqlalchemy import select

from portal.admin import queries
from portal.admin.actions import ActionRefused
from portal.admin.routes import bp, support_required
from portal.audit import record_support_action
from portal.billing.drift import drift_found
from portal.billing.events import enqueue_processing
from portal.billing.sync import SYNCABLE_STATUSES
from portal.billing.sync_queue import CLOSE_JOB, SYNC_JOB, enqueue_close, enqueue_sync
from portal.extensions import db
from portal.models import AuditEntry, Invoice, Organization, StripeEvent, User
from portal.models.types import utcnow
from portal.queue import QUEUE_NAMES, redis_connection
from portal.text import has_control_characters

MAX_REASON = 500
# An open invoice this long past its period's end has missed its close (the close
# sweep runs every few minutes).
CLOSE_OVERDUE = timedelta(hours=1)
FAILED_JOBS_SHOWN = 100


# --- the audit entry -----------------------------------------------------------------


# --- the actions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    name: str  # in URLs and audit entries
    title: str
    state: str  # the stuck state it answers
    explanation: str  # what happens on confirm


RECOVERIES = {r.name: r for r in (
    Recovery("recreate-draft", "Recreate the Stripe draft", "Stripe draft missing",
             "Queues a sync of the invoice (for a closing invoice, its close). The sync reads the Stripe draft and, "
             "finding it deleted, creates a new draft with every line of the portal's invoice and the same "
             "finalization schedule; a closing invoice is then finalized, and Stripe collects it. If the draft "
             "is there after all, the sync only brings it in step."),
    Recovery("recreate-customer", "Recreate the Stripe customer", "Stripe customer missing",
             "Queues a sync of each of the organization's open and closing invoices (a close for a closing one). "
             "The sync finds the Stripe customer deleted (or unknown to this Stripe account), creates it again "
             "with the organization's name and billing email, then a new draft for each invoice. Payment methods "
             "saved on the deleted customer are not brought back: the customer adds one again."),
    Recovery("clear-block", "Clear the block", "Sync blocked",
             "Clears the block and queues a sync (a close, for a closing invoice). The sync re-reads the Stripe "
             "invoice: if Stripe finalized it, the portal's invoice becomes finalized with Stripe's number and "
             "totals (what did not reach Stripe moves to the next invoice); if it is still a draft, the sync "
             "brings it in step."),
    Recovery("retry-close", "Retry the close", "Close stopped",
             "Queues the end-of-cycle close again: the final sync (recreating the Stripe draft or customer if they "
             "were deleted), then the finalize at Stripe with automatic collection, which charges the customer's "
             "payment method. An invoice Stripe already finalized is taken as it is."),
    Recovery("retry-sync", "Retry the sync", "Last sync failed",
             "Queues a sync of the invoice now. It reads Stripe again and applies only what differs, with new "
             "idempotency keys; a write whose outcome was unknown is found by its metadata, never made twice."),
    Recovery("reprocess-event", "Reprocess the Stripe event", "Stripe event not processed",
             "Queues the event's processing again, past the retries the sweep gives up after. The handler re-reads "
             "the invoice or customer from Stripe and moves the portal forward to that state; an event already "
             "superseded changes nothing."),
    Recovery("requeue-job", "Requeue the failed job", "Failed job",
             "Moves the job from RQ's failed job registry back to its queue, with the same arguments. Jobs are "
             "safe to run twice: a sync or close finds what is already done and does the rest."),
)}


@dataclass
class RecoveryResult:
    audit: AuditEntry
    done: str
    jobs: list[str] = field(default_factory=list)
    enqueue_error: str | None = None


def clean_reason(reason: str | None) -> str:
    """The reason as stored (whitespace collapsed); ActionRefused if there is none."""
    text = " ".join((reason or "").split())
    if not text:
        raise ActionRefused("a reason is required: say why (a ticket, what the customer reported)")
    if len(text) > MAX_REASON or has_control_characters(text):
        raise ActionRefused(f"the reason must be plain text of at most {MAX_REASON} characters")
    return text


def _commit_then_enqueue(entry: AuditEntry, done: str, enqueues: list[Callable[[], str]]) -> RecoveryResult:
    db.session.commit()
    result = RecoveryResult(entry, done)
    try:
        result.jobs = [enqueue() for enqueue in enqueues]
    except (RedisError, InvalidJobOperation, NoSuchJobError) as error:  # Redis down; a job requeued meanwhile
        result.enqueue_error = f"{type(error).__name__}: {error}"
    if result.enqueue_error is not None:
        # The audit is append-only: the failure to queue is an entry of its own.
        actor = db.session.get(User, entry.actor_user_id) if entry.actor_user_id else entry.actor
        record_support_action(actor, "job.enqueue_failed",
                              organization=db.session.get(Organization, entry.organization_id)
                              if entry.organization_id else None,
                              invoice=db.session.get(Invoice, entry.invoice_id) if entry.invoice_id else None,
                              detail={"audit_entry_id": entry.id, "for_action": entry.action,
                                      "error": result.enqueue_error})
    db.session.commit()
    return result


def _invoice_job(invoice: Invoice) -> Callable[[], str]:
    """The job that takes the invoice on: its close if closing, else a sync."""
    invoice_id = invoice.id
    if invoice.status == "closing":
        return lambda: enqueue_close(invoice_id)
    return lambda: enqueue_sync(invoice_id, trigger="manual")


def _require_draft_stage(invoice: Invoice) -> None:
    if invoice.status not in SYNCABLE_STATUSES:
        raise ActionRefused(f"invoice #{invoice.id} is {invoice.status}: it is billed, and Stripe no longer "
                            "holds a draft for it")


def _require_unblocked(invoice: Invoice) -> None:
    if invoice.sync_blocked:
        raise ActionRefused(f"invoice #{invoice.id}'s sync is blocked ({invoice.sync_blocked}): clear the block "
                            "first, which runs the sync")


def recreate_stripe_draft(invoice: Invoice, actor: User, reason: str) -> RecoveryResult:
    _require_draft_stage(invoice)
    _require_unblocked(invoice)
    reason = clean_reason(reason)
    entry = record_support_action(actor, "recovery.recreate_draft", invoice=invoice, reason=reason,
                                  detail={"stripe_invoice_id": invoice.stripe_invoice_id, "status": invoice.status})
    what = "close" if invoice.status == "closing" else "sync"
    return _commit_then_enqueue(entry, f"A {what} of invoice #{invoice.id} that recreates its Stripe draft is queued",
                                [_invoice_job(invoice)])


def recreate_stripe_customer(organization: Organization, actor: User, reason: str) -> RecoveryResult:
    invoices = list(db.session.scalars(select(Invoice).where(
        Invoice.organization_id == organization.id, Invoice.status.in_(SYNCABLE_STATUSES)).order_by(Invoice.id)))
    if not invoices:
        raise ActionRefused(f"{organization.name} has no open or closing invoice: the next one's first sync "
                            "creates the Stripe customer")
    for invoice in invoices:
        _require_unblocked(invoice)
    reason = clean_reason(reason)
    entry = record_support_action(actor, "recovery.recreate_customer", organization=organization, reason=reason,
                                  detail={"stripe_customer_id": organization.stripe_customer_id,
                                          "invoices": [invoice.id for invoice in invoices]})
    return _commit_then_enqueue(
        entry, f"Syncs that recreate {organization.name}'s Stripe customer are queued "
               f"(invoice{'s' if len(invoices) > 1 else ''} {', '.join(f'#{i.id}' for i in invoices)})",
        [_invoice_job(invoice) for invoice in invoices])


def clear_block(invoice: Invoice, actor: User, reason: str) -> RecoveryResult:
    _require_draft_stage(invoice)
    if not invoice.sync_blocked:
        raise ActionRefused(f"invoice #{invoice.id}'s sync is not blocked")
    reason = clean_reason(reason)
    entry = record_support_action(actor, "recovery.clear_block", invoice=invoice, reason=reason,
                                  detail={"blocked": invoice.sync_blocked})
    invoice.sync_blocked = None
    return _commit_then_enqueue(entry, f"The block on invoice #{invoice.id} is cleared and its sync queued",
                                [_invoice_job(invoice)])


def retry_close(invoice: Invoice, actor: User, reason: str) -> RecoveryResult:
    if invoice.status == "open" and invoice.period_end > utcnow():
        raise ActionRefused(f"invoice #{invoice.id}'s period runs until {invoice.period_end:%Y-%m-%d %H:%M} UTC: "
                            "there is no close to retry (closing it early is “Close cycle now”)")
    _require_draft_stage(invoice)
    _require_unblocked(invoice)
    reason = clean_reason(reason)
    entry = record_support_action(actor, "recovery.retry_close", invoice=invoice, reason=reason,
                                  detail={"status": invoice.status})
    invoice_id = invoice.id
    return _commit_then_enqueue(entry, f"The close of invoice #{invoice.id} is queued again",
                                [lambda: enqueue_close(invoice_id)])


def retry_sync(invoice: Invoice, actor: User, reason: str) -> RecoveryResult:
    _require_draft_stage(invoice)
    _require_unblocked(invoice)
    reason = clean_reason(reason)
    entry = record_support_action(actor, "recovery.retry_sync", invoice=invoice, reason=reason)
    invoice_id = invoice.id
    return _commit_then_enqueue(entry, f"A sync of invoice #{invoice.id} is queued",
                                [lambda: enqueue_sync(invoice_id, trigger="manual")])


def reprocess_event(event: StripeEvent, actor: User, reason: str) -> RecoveryResult:
    if event.processed_at is not None:
        raise ActionRefused(f"Stripe event {event.stripe_event_id} was processed at "
                            f"{event.processed_at:%Y-%m-%d %H:%M:%S} UTC")
    reason = clean_reason(reason)
    invoice = _invoice_of_event(event)
    entry = record_support_action(actor, "recovery.reprocess_event", invoice=invoice, reason=reason,
                                  detail={"stripe_event_id": event.stripe_event_id, "type": event.type,
                                          "attempts": event.attempts, "last_error": event.last_error})
    row_id = event.id

    def enqueue() -> str:
        # A failed run of its job stays in the failed registry under the same id: take
        # it out, so the registry lists only what is still failing.
        FailedJobRegistry("webhooks", connection=redis_connection()).remove(f"stripe-event-{row_id}")
        enqueue_processing(row_id)
        return f"stripe-event-{row_id}"

    return _commit_then_enqueue(entry, f"Stripe event {event.stripe_event_id} is queued for processing", [enqueue])


def _invoice_of_event(event: StripeEvent) -> Invoice | None:
    obj = (event.payload or {}).get("data", {}).get("object", {})
    if not isinstance(obj, dict) or obj.get("object") != "invoice" or not obj.get("id"):
        return None
    return db.session.scalar(select(Invoice).where(Invoice.stripe_invoice_id == str(obj["id"])))


@dataclass
class FailedJob:
    queue: str
    job: Job

    @property
    def invoice_id(self) -> int | None:
        if self.job.func_name in (SYNC_JOB, CLOSE_JOB, "jobs.cycles.refresh_invoice_from_stripe") and self.job.args:
            return self.job.args[0]
        return None

    @property
    def error(self) -> str:
        text = (self.job.latest_result().exc_string if self.job.latest_result() else "") or ""
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return lines[-1] if lines else ""


def failed_job(queue_name: str, job_id: str) -> FailedJob | None:
    """The job, if it is in that queue's failed job registry and still failed."""
    if queue_name not in QUEUE_NAMES:
        return None
    redis = redis_connection()
    if job_id not in FailedJobRegistry(queue_name, connection=redis).get_job_ids(cleanup=False):
        return None
    try:
        job = Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        return None
    return FailedJob(queue_name, job) if job.get_status() == JobStatus.FAILED else None


def failed_jobs(limit: int = FAILED_JOBS_SHOWN) -> list[FailedJob]:
    """Jobs in the failed job registries that are still failed (newest first per queue);
    a job queued again under the same id (a close, an event) is no longer listed."""
    redis, found = redis_connection(), []
    for name in QUEUE_NAMES:
        ids = FailedJobRegistry(name, connection=redis).get_job_ids(0, limit - 1, desc=True)
        for job in Job.fetch_many(ids, connection=redis):
            if job is not None and job.get_status() == JobStatus.FAILED:
                found.append(FailedJob(name, job))
    return found[:limit]


def requeue_failed_job(failed: FailedJob, actor: User, reason: str) -> RecoveryResult:
    reason = clean_reason(reason)
    invoice = db.session.get(Invoice, failed.invoice_id) if failed.invoice_id else None
    entry = record_support_action(actor, "recovery.requeue_job", invoice=invoice, reason=reason,
                                  detail={"queue": failed.queue, "job_id": failed.job.id,
                                          "function": failed.job.func_name, "args": list(map(str, failed.job.args)),
                                          "error": failed.error})

    def enqueue() -> str:
        FailedJobRegistry(failed.queue, connection=redis_connection()).requeue(failed.job.id)
        return failed.job.id

    return _commit_then_enqueue(entry, f"Job {failed.job.id} ({failed.job.func_name}) is back on the "
                                       f"{failed.queue} queue", [enqueue])


INVOICE_RECOVERIES = {"recreate-draft": recreate_stripe_draft, "clear-block": clear_block,
                      "retry-close": retry_close, "retry-sync": retry_sync}


# --- what is stuck -------------------------------------------------------------------------


@dataclass
class StuckInvoice:
    invoice: Invoice
    states: list[str] = field(default_factory=list)
    recoveries: list[str] = field(default_factory=list)

    def add(self, state: str, *recoveries: str) -> None:
        self.states.append(state)
        self.recoveries.extend(r for r in recoveries if r not in self.recoveries)


STUCK_LISTED = 200  # the recovery page lists at most this many invoices from each source


def stuck_invoices(organization: Organization | None = None, now: datetime | None = None) -> list[StuckInvoice]:
    """Open and closing invoices in a state that needs a recovery, each with the
    states found and the recoveries that answer them."""
    now = now or utcnow()
    found: dict[int, StuckInvoice] = {}

    def entry(invoice: Invoice) -> StuckInvoice:
        return found.setdefault(invoice.id, StuckInvoice(invoice))

    rows, _more = queries.discrepancies(now, per_page=STUCK_LISTED)
    for discrepancy in rows:
        invoice = discrepancy.invoice
        if invoice.sync_blocked:
            entry(invoice).add(f"sync blocked: {invoice.sync_blocked}", "clear-block")
        run = discrepancy.last_sync
        if run is not None and run.outcome not in queries.GOOD_OUTCOMES:
            entry(invoice).add(f"last sync: {run.outcome.replace('_', ' ')}", "retry-sync")
    for check in drift_found(limit=STUCK_LISTED):
        recovery = {"draft_missing": "recreate-draft", "customer_missing": "recreate-customer",
                    "not_draft": "retry-sync"}.get(check.outcome)
        if recovery:
            entry(check.invoice).add(f"{check.outcome.replace('_', ' ')} (compared {check.checked_at:%Y-%m-%d %H:%M})",
                                     recovery)
    late = list(db.session.scalars(select(Invoice).where(
        (Invoice.status == "closing")
        | ((Invoice.status == "open") & (Invoice.period_end < now - CLOSE_OVERDUE))
        | (Invoice.status.in_(SYNCABLE_STATUSES) & Invoice.finalization_error.is_not(None))
    ).order_by(Invoice.id).limit(200)))
    for invoice in late:
        if invoice.status == "closing":
            entry(invoice).add("closing, not finalized yet", "retry-close", "recreate-draft")
        elif invoice.period_end < now - CLOSE_OVERDUE:
            entry(invoice).add(f"period ended {invoice.period_end:%Y-%m-%d %H:%M}, not closed", "retry-close")
        if invoice.finalization_error:
            entry(invoice).add(f"Stripe could not finalize: {invoice.finalization_error}", "retry-close")
    for failed in failed_jobs():
        if failed.invoice_id and failed.invoice_id in found:
            found[failed.invoice_id].add(f"failed job {failed.job.id}")
    stuck = sorted(found.values(), key=lambda s: s.invoice.id)
    if organization is not None:
        stuck = [s for s in stuck if s.invoice.organization_id == organization.id]
    return stuck


# A stored event not processed this long after it arrived has lost its job and the
# sweep's too (the sweep runs every minute).
EVENT_OVERDUE = timedelta(minutes=10)


def failed_events(limit: int = 200) -> list[StripeEvent]:
    """Stored Stripe events whose processing failed, or that are still unprocessed long
    after they arrived."""
    overdue = utcnow() - EVENT_OVERDUE
    return [event for event in queries.failed_stripe_events(limit) if event.attempts > 0 or event.received_at < overdue]


# --- pages -------------------------------------------------------------------------------------


@bp.get("/recovery")
@support_required
def recovery():
    organization = None
    if request.args.get("org"):
        organization = queries.organization_by_slug(request.args["org"]) or abort(404)
    return render_template("admin/recovery.html", recoveries=RECOVERIES, organization=organization,
                           stuck=stuck_invoices(organization), events=[] if organization else failed_events(),
                           jobs=[] if organization else failed_jobs())


def _confirm(recovery: Recovery, target_facts: dict, perform: Callable[[str], RecoveryResult], back: str):
    """GET: the confirmation page; POST: the action, with the reason typed there."""
    error = None
    if request.method == "POST":
        try:
            result = perform(request.form.get("reason", ""))
        except ActionRefused as refused:
            db.session.rollback()
            error = str(refused)
        else:
            if result.enqueue_error:
                flash(f"{result.done}, but the job could not be queued ({result.enqueue_error}); the periodic "
                      "sweeps will pick it up.", "error")
            else:
                flash(f"{recovery.title}: {result.done} (job {', '.join(result.jobs)}).", "success")
            return redirect(back)
    return render_template("admin/recovery_confirm.html", recovery=recovery, facts=target_facts, error=error,
                           back=back, reason=request.form.get("reason", "")), (400 if error else 200)


def _invoice_facts(invoice: Invoice) -> dict:
    return {"Invoice": f"#{invoice.id} ({invoice.status})", "Organization": invoice.organization.name,
            "Period": f"{invoice.period_start:%Y-%m-%d %H:%M} to {invoice.period_end:%Y-%m-%d %H:%M} UTC",
            "Stripe invoice": invoice.stripe_invoice_id or "none yet",
            "Sync": f"blocked: {invoice.sync_blocked}" if invoice.sync_blocked else
                    ("changes pending" if invoice.has_unsynced_changes else "in step")}


def _back(organization: Organization | None = None) -> str:
    return url_for("admin.recovery", org=organization.slug if organization else None)


@bp.route("/recovery/invoices/<dbint:invoice_id>/<name>", methods=["GET", "POST"])
@support_required
def recover_invoice(invoice_id: int, name: str):
    action = INVOICE_RECOVERIES.get(name) or abort(404)
    invoice = db.session.get(Invoice, invoice_id) or abort(404)
    return _confirm(RECOVERIES[name], _invoice_facts(invoice),
                    lambda reason: action(invoice, current_user, reason), _back(invoice.organization))


@bp.route("/recovery/orgs/<slug:slug>/recreate-customer", methods=["GET", "POST"])
@support_required
def recover_customer(slug: str):
    organization = queries.organization_by_slug(slug) or abort(404)
    facts = {"Organization": f"{organization.name} ({organization.slug})",
             "Stripe customer": organization.stripe_customer_id or "none yet",
             "Billing email": organization.billing_email}
    return _confirm(RECOVERIES["recreate-customer"], facts,
                    lambda reason: recreate_stripe_customer(organization, current_user, reason), _back(organization))


@bp.route("/recovery/events/<dbint:event_id>/reprocess", methods=["GET", "POST"])
@support_required
def recover_event(event_id: int):
    event = db.session.get(StripeEvent, event_id) or abort(404)
    facts = {"Stripe event": event.stripe_event_id, "Type": event.type, "Attempts": str(event.attempts),
             "Last error": event.last_error or "none"}
    return _confirm(RECOVERIES["reprocess-event"], facts,
                    lambda reason: reprocess_event(event, current_user, reason), _back())


@bp.route("/recovery/jobs/<queue_name>/<jobid:job_id>/requeue", methods=["GET", "POST"])
@support_required
def recover_job(queue_name: str, job_id: str):
    failed = failed_job(queue_name, job_id)
    if failed is None:
        abort(404)
    facts = {"Job": failed.job.id, "Queue": failed.queue, "Function": failed.job.func_name,
             "Arguments": ", ".join(map(str, failed.job.args)) or "none", "Error": failed.error or "unknown"}
    return _confirm(RECOVERIES["requeue-job"], facts,
                    lambda reason: requeue_failed_job(failed, current_user, reason), _back())
