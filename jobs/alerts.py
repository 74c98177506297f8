"""Spend-alert jobs: thin wrappers around `portal.billing.alerts` and `portal.mail`."""
from __future__ import annotations

from jobs.app import get_app


def evaluate_invoice_alerts(invoice_id: int) -> dict:
    from portal.billing.alerts import evaluate_and_queue

    with get_app().app_context():
        return {"crossings": evaluate_and_queue(invoice_id)}


def deliver_outbox() -> dict:
    """Send the outbox's unsent mails through SMTP (nothing when SMTP is not configured)."""
    from portal.mail import deliver_outbox as deliver

    with get_app().app_context():
        return deliver().as_dict()
