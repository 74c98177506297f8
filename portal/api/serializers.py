"""JSON shapes of the API's answers."""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from portal.models import Invoice, ServiceAttachment, SyncRun


def iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def decimal_text(value: Decimal) -> str:
    text = f"{value.normalize():f}"
    return text


def invoice_json(invoice: Invoice, last_run: SyncRun | None = None, with_items: bool = True) -> dict:
    body = {
        "id": invoice.id,
        "organization": invoice.organization.slug,
        "period": {"start": iso(invoice.period_start), "end": iso(invoice.period_end)},
        "status": invoice.status,
        "currency": invoice.currency,
        "total": invoice.total_cents,
        "stripe_invoice_id": invoice.stripe_invoice_id,
        "number": invoice.number,
        "hosted_invoice_url": invoice.hosted_invoice_url,
        "invoice_pdf": invoice.invoice_pdf,
        "has_unsynced_changes": invoice.has_unsynced_changes,
        # Collection, as Stripe last reported it (finalized invoices).
        "past_due": invoice.past_due,
        "payment": {
            "amount_due": invoice.amount_due_cents,
            "amount_paid": invoice.amount_paid_cents,
            "attempts": invoice.payment_attempts,
            "next_attempt": iso(invoice.next_payment_attempt_at),
            "problem": invoice.payment_problem,
            "carried_to_balance": invoice.carried_to_balance_cents,
        },
        "last_sync": {"at": iso(last_run.finished_at or last_run.started_at), "outcome": last_run.outcome}
        if last_run else None,
    }
    if with_items:
        body["items"] = [
            {
                "id": item.id,
                "product": item.product.code,
                "resource": item.resource,
                "description": item.description,
                "quantity": decimal_text(item.quantity),
                "unit_price": decimal_text(item.unit_price),
                "amount": item.amount_cents,
                "period": {"start": iso(item.origin_period_start), "end": iso(item.origin_period_end)}
                if item.origin_period_start else None,
            }
            for item in invoice.items
        ]
    return body


def service_json(attachment: ServiceAttachment) -> dict:
    return {
        "id": attachment.id,
        "organization": attachment.organization.slug,
        "product": attachment.product.code,
        "quantity": decimal_text(attachment.quantity),
        "resource": attachment.resource,
        "attached_at": iso(attachment.attached_at),
        "detached_at": iso(attachment.detached_at),
    }
