"""Support's actions: sync now, close cycle now, add a credit. Each writes an
AuditEntry (who, what, which object) and commits before anything is enqueued, so a
job never runs ahead of the change it is about; none calls Stripe (workers do).

A lost enqueue (Redis down) is recorded on the audit entry and reported to the
caller; the database stays the truth, and the periodic sweep catches up.
"""
from __future__ import annotations

from dataclasses import dataclass

from redis.exceptions import RedisError

from portal.billing.credits import add_credit
from portal.billing.sync import SYNCABLE_STATUSES
from portal.billing.sync_queue import enqueue_close, enqueue_sync
from portal.extensions import db
from portal.models import AuditEntry, Invoice, InvoiceItem, Organization, User


class ActionRefused(Exception):
    """The action does not apply to the object as it is now; the message says why."""


@dataclass
class ActionResult:
    audit: AuditEntry
    job_id: str | None = None
    enqueue_error: str | None = None


def record(actor: User, action: str, object_type: str, object_id: object, **details) -> AuditEntry:
    """Add an audit entry to the session (the caller commits)."""
    entry = AuditEntry(actor_user_id=actor.id, actor=actor.email, action=action, object_type=object_type,
                       object_id=str(object_id), details=details)
    db.session.add(entry)
    return entry


def _enqueue_after_commit(entry: AuditEntry, enqueue) -> ActionResult:
    db.session.commit()
    result = ActionResult(entry)
    try:
        result.job_id = enqueue()
    except RedisError as error:
        result.enqueue_error = f"{type(error).__name__}: {error}"
    entry.details = {**entry.details, "job_id": result.job_id, "enqueue_error": result.enqueue_error}
    db.session.commit()
    return result


def sync_now(invoice: Invoice, actor: User) -> ActionResult:
    """Queue a manual sync of the invoice (deduplicated with one already waiting)."""
    if invoice.status not in SYNCABLE_STATUSES:
        raise ActionRefused(f"invoice #{invoice.id} is {invoice.status}: only open or closing invoices sync")
    entry = record(actor, "invoice.sync_now", "invoice", invoice.id, organization=invoice.organization.slug)
    invoice_id = invoice.id
    return _enqueue_after_commit(entry, lambda: enqueue_sync(invoice_id, trigger="manual"))


def close_cycle_now(invoice: Invoice, actor: User) -> ActionResult:
    """Queue the close of the invoice's cycle now (its period ends when the job runs).
    The job is idempotent, so a second click queues a job that finds nothing to do."""
    if invoice.status not in SYNCABLE_STATUSES:
        raise ActionRefused(f"invoice #{invoice.id} is {invoice.status}: only an open invoice can be closed")
    entry = record(actor, "invoice.close_cycle_now", "invoice", invoice.id, organization=invoice.organization.slug)
    invoice_id = invoice.id
    return _enqueue_after_commit(entry, lambda: enqueue_close(invoice_id, end_now=True))


def give_credit(organization: Organization, amount_in_dollars: str, reason: str, actor: User) -> ActionResult:
    """Credit the organization's open invoice (a negative line, the invoice marked
    unsynced, the audit entry: one transaction), then queue a sync to carry it to Stripe.
    Raises CreditError (nothing written) for an amount or reason that will not do."""
    item: InvoiceItem = add_credit(organization, amount_in_dollars, reason)
    entry = record(actor, "invoice.credit", "invoice", item.invoice_id, organization=organization.slug,
                   invoice_item_id=item.id, amount_cents=-item.amount_cents, reason=" ".join(reason.split()))
    invoice_id = item.invoice_id
    return _enqueue_after_commit(entry, lambda: enqueue_sync(invoice_id, trigger="manual"))
