"""Support's actions: sync now, close cycle now, add and remove a credit. Each writes
its audit entry (who, what, which invoice, why: `portal.audit`) in the transaction
of the change, and commits before anything is enqueued, so a job never runs ahead of
the change it is about; none calls Stripe (workers do).

A lost enqueue (Redis down) is reported to the caller and recorded as an entry of
its own (the audit is append-only); the database stays the truth, and the periodic
sweep catches up.
"""
from __future__ import annotations

from dataclasses import dataclass

from redis.exceptions import RedisError

from portal.audit import clean_reason, record_support_action
from portal.billing.credits import add_credit, remove_credit
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


def _enqueue_after_commit(entry: AuditEntry, actor: User, enqueue) -> ActionResult:
    db.session.commit()
    result = ActionResult(entry)
    try:
        result.job_id = enqueue()
    except RedisError as error:
        result.enqueue_error = f"{type(error).__name__}: {error}"
        record_support_action(actor, "job.enqueue_failed", organization=_organization_of(entry),
                              invoice=db.session.get(Invoice, entry.invoice_id) if entry.invoice_id else None,
                              detail={"audit_entry_id": entry.id, "for_action": entry.action,
                                      "error": result.enqueue_error})
        db.session.commit()
    return result


def _organization_of(entry: AuditEntry) -> Organization | None:
    return db.session.get(Organization, entry.organization_id) if entry.organization_id else None


def sync_now(invoice: Invoice, actor: User, reason: str | None = None) -> ActionResult:
    """Queue a manual sync of the invoice (deduplicated with one already waiting)."""
    if invoice.status not in SYNCABLE_STATUSES:
        raise ActionRefused(f"invoice #{invoice.id} is {invoice.status}: only open or closing invoices sync")
    entry = record_support_action(actor, "invoice.sync_now", invoice=invoice, reason=clean_reason(reason, False),
                                  detail={"organization": invoice.organization.slug})
    invoice_id = invoice.id
    return _enqueue_after_commit(entry, actor, lambda: enqueue_sync(invoice_id, trigger="manual"))


def close_cycle_now(invoice: Invoice, actor: User, reason: str | None) -> ActionResult:
    """Queue the close of the invoice's cycle now (its period ends when the job runs;
    Stripe then finalizes the invoice and charges the customer). The job is
    idempotent, so a second click queues a job that finds nothing to do."""
    if invoice.status not in SYNCABLE_STATUSES:
        raise ActionRefused(f"invoice #{invoice.id} is {invoice.status}: only an open invoice can be closed")
    entry = record_support_action(actor, "invoice.close_cycle_now", invoice=invoice, reason=clean_reason(reason),
                                  detail={"organization": invoice.organization.slug,
                                          "total_cents": invoice.total_cents})
    invoice_id = invoice.id
    return _enqueue_after_commit(entry, actor, lambda: enqueue_close(invoice_id, end_now=True))


def give_credit(organization: Organization, amount_in_dollars: str, reason: str, actor: User) -> ActionResult:
    """Credit the organization's open invoice (a negative line, the invoice marked
    unsynced, the audit entry: one transaction), then queue a sync to carry it to Stripe.
    Raises CreditError (nothing written) for an amount or reason that will not do."""
    item: InvoiceItem = add_credit(organization, amount_in_dollars, reason)
    invoice = db.session.get(Invoice, item.invoice_id)
    entry = record_support_action(actor, "invoice.credit", organization=organization, invoice=invoice,
                                  reason=reason, detail={"organization": organization.slug, "invoice_item_id": item.id,
                                                         "amount_cents": -item.amount_cents,
                                                         "reason": " ".join(reason.split())})
    invoice_id = item.invoice_id
    return _enqueue_after_commit(entry, actor, lambda: enqueue_sync(invoice_id, trigger="manual"))


def take_back_credit(item: InvoiceItem, reason: str, actor: User) -> ActionResult:
    """Remove a credit from its open invoice (audited), then queue a sync that removes
    it at Stripe. Raises CreditError or ReasonError, changing nothing, when it cannot."""
    reason = clean_reason(reason)
    invoice = item.invoice
    detail = {"organization": invoice.organization.slug, "invoice_item_id": item.id,
              "description": item.description}
    cents = remove_credit(item)
    entry = record_support_action(actor, "invoice.credit_removed", invoice=invoice, reason=reason,
                                  detail={**detail, "amount_cents": cents})
    invoice_id = invoice.id
    return _enqueue_after_commit(entry, actor, lambda: enqueue_sync(invoice_id, trigger="manual"))
