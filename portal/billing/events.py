"""Stripe events: stored once (unique on Stripe's id), processed by a job through a
registry of handlers, one function per event type.

Processing is idempotent: handlers move states only forward and, when order matters,
re-read the invoice from Stripe instead of trusting the event's copy; an event older
than the state already applied changes nothing. Failed processing is recorded
(attempts, last error) and retried by the stored-event sweep, visible to support.
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from portal.extensions import db
from portal.models import Invoice, StripeEvent
from portal.models.stripe_events import event_subjects
from portal.models.types import utcnow
from portal.queue import queue

PROCESS_JOB = "jobs.webhooks.process_stripe_event"
MAX_ATTEMPTS = 10

Handler = Callable[[dict], str]
_handlers: dict[str, Handler] = {}


def handler(*event_types: str):
    """Register a function as the handler of these event types."""
    def register(function: Handler) -> Handler:
        for event_type in event_types:
            _handlers[event_type] = function
        return function
    return register


def has_handler(event_type: str) -> bool:
    return event_type in _handlers


def handled_event_types() -> list[str]:
    """Every event type a handler takes: what the webhook endpoint must send."""
    return sorted(_handlers)


def store_event(event: dict) -> tuple[int, bool]:
    """Store the event unless it is stored already; returns (row id, newly stored).
    Concurrent deliveries of one event store one row (INSERT ... ON CONFLICT). An
    event no handler takes (`invoiceitem.updated`, ...) is stored as processed: no
    job is spent on it."""
    insert = postgresql.insert if db.engine.dialect.name == "postgresql" else sqlite.insert
    now = utcnow()
    organization_id, invoice_id = event_subjects(db.session.connection(), event)
    inserted = db.session.execute(
        insert(StripeEvent)
        .values(stripe_event_id=event["id"], type=event["type"], stripe_created=event["created"], payload=event,
                received_at=now, attempts=0, processed_at=None if has_handler(event["type"]) else now,
                organization_id=organization_id, invoice_id=invoice_id)
        .on_conflict_do_nothing(index_elements=["stripe_event_id"])
        .returning(StripeEvent.id)
    ).scalar()
    if inserted is not None:
        return inserted, True
    return db.session.scalar(select(StripeEvent.id).where(StripeEvent.stripe_event_id == event["id"])), False


def enqueue_processing(row_id: int) -> None:
    queue("webhooks").enqueue(PROCESS_JOB, row_id, job_id=f"stripe-event-{row_id}", result_ttl=3600,
                              failure_ttl=7 * 86400)


def process_event(row_id: int) -> str:
    """Run the event's handler once it succeeds; returns what the handler did."""
    event = db.session.get(StripeEvent, row_id)
    if event is None:
        raise LookupError(f"no stored Stripe event {row_id}")
    if event.processed_at is not None:
        return "already processed"
    payload, event_type = event.payload, event.type
    db.session.commit()
    function = _handlers.get(event_type)
    try:
        outcome = function(payload) if function else "ignored (no handler for this type)"
    except Exception as error:
        db.session.rollback()
        db.session.execute(update(StripeEvent).where(StripeEvent.id == row_id).values(
            attempts=StripeEvent.attempts + 1, last_error=f"{type(error).__name__}: {error}"[:2000]))
        db.session.commit()
        raise
    db.session.execute(update(StripeEvent).where(StripeEvent.id == row_id, StripeEvent.processed_at.is_(None))
                       .values(processed_at=utcnow(), attempts=StripeEvent.attempts + 1, last_error=None))
    _fill_subjects(row_id, payload)
    db.session.commit()
    return outcome


def _fill_subjects(row_id: int, payload: dict) -> None:
    """Name the event's organization and invoice where storing it could not: the event
    came before the portal knew the Stripe ids (or the handler adopted the invoice)."""
    organization_id, invoice_id = event_subjects(db.session.connection(), payload)
    if invoice_id is not None:
        db.session.execute(update(StripeEvent).where(StripeEvent.id == row_id, StripeEvent.invoice_id.is_(None))
                           .values(invoice_id=invoice_id))
    if organization_id is not None:
        db.session.execute(update(StripeEvent)
                           .where(StripeEvent.id == row_id, StripeEvent.organization_id.is_(None))
                           .values(organization_id=organization_id))


def unprocessed_event_ids(older_than: timedelta = timedelta(seconds=10)) -> list[int]:
    """Stored events not processed yet (their job was lost or failed), oldest first."""
    return list(db.session.scalars(
        select(StripeEvent.id).where(
            StripeEvent.processed_at.is_(None),
            StripeEvent.attempts < MAX_ATTEMPTS,
            or_(StripeEvent.received_at < utcnow() - older_than, StripeEvent.attempts > 0),
        ).order_by(StripeEvent.received_at)
    ))


# --- handlers ----------------------------------------------------------------------


def _portal_invoice_id(stripe_invoice: dict) -> int | None:
    by_stripe_id = db.session.scalar(select(Invoice.id).where(Invoice.stripe_invoice_id == stripe_invoice.get("id")))
    if by_stripe_id is not None:
        return by_stripe_id
    # Created by a sync that crashed before it recorded the Stripe id: adopt by metadata.
    portal_id = (stripe_invoice.get("metadata") or {}).get("portal_invoice_id")
    if portal_id and str(portal_id).isdigit():
        invoice = db.session.get(Invoice, int(portal_id))
        if invoice is not None and invoice.stripe_invoice_id is None:
            invoice.stripe_invoice_id = stripe_invoice["id"]
            db.session.commit()
            return invoice.id
    return None


@handler("invoice.finalized", "invoice.paid", "invoice.payment_succeeded", "invoice.payment_failed",
         "invoice.voided", "invoice.marked_uncollectible", "invoice.updated", "invoice.finalization_failed",
         "invoice.payment_action_required")
def invoice_state_changed(event: dict) -> str:
    """Whatever the event says, re-read the invoice from Stripe and move the portal's
    invoice forward to that state: order and duplicates then do not matter. (Stripe's
    `invoice.upcoming` is sent only before subscription renewals, so the portal's
    one-off drafts never get one: there is no handler for it.)"""
    from portal.billing.closing import refresh_from_stripe

    stripe_invoice = event["data"]["object"]
    invoice_id = _portal_invoice_id(stripe_invoice)
    if invoice_id is None:
        return "not a portal invoice"
    invoice = db.session.get(Invoice, invoice_id)
    if invoice.stripe_state_at is not None and event["created"] < invoice.stripe_state_at \
            and invoice.status not in ("open", "closing"):
        return "older than the state already applied"
    problem = "action_required" if event["type"] == "invoice.payment_action_required" else None
    status = refresh_from_stripe(invoice_id, problem=problem)
    db.session.execute(update(Invoice).where(
        Invoice.id == invoice_id, or_(Invoice.stripe_state_at.is_(None), Invoice.stripe_state_at < event["created"])
    ).values(stripe_state_at=event["created"]))
    db.session.commit()
    return f"invoice {invoice_id} is {status}"


@handler("customer.created", "customer.updated", "payment_method.attached", "payment_method.detached",
         "payment_method.updated")
def customer_changed(event: dict) -> str:
    """The customer's default payment method or balance may have changed: re-read it."""
    from portal.billing.customers import organization_of_customer, refresh_customer

    obj = event["data"]["object"]
    customer_id = obj.get("id") if obj.get("object") == "customer" else obj.get("customer")
    organization_id = organization_of_customer(customer_id)
    if organization_id is None:
        # A detached method no longer names its customer: the customer event that
        # Stripe sends with it (a changed default) tells.
        return "not a portal customer"
    return refresh_customer(organization_id, seen_at=event["created"])


@handler("customer.deleted")
def customer_deleted(event: dict) -> str:
    """Deleted in Stripe's dashboard: the organization's drafts went with it. Sync its
    open and closing invoices now; the sync creates the customer and drafts again."""
    from portal.billing.customers import organization_of_customer
    from portal.billing.sync_queue import enqueue_sync

    organization_id = organization_of_customer(event["data"]["object"].get("id"))
    if organization_id is None:
        return "not a portal customer (or already replaced)"
    invoice_ids = list(db.session.scalars(select(Invoice.id).where(
        Invoice.organization_id == organization_id, Invoice.status.in_(("open", "closing")))))
    db.session.commit()
    return "syncs queued: " + ", ".join(f"{i} ({enqueue_sync(i, trigger='webhook')})" for i in invoice_ids)
