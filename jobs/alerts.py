"""Spend-alert jobs: thin wrappers around `portal.billing.alerts` and `portal.mail`."""
from __future__ import annotations

import logging

from jobs.app import get_app

log = logging.getLogger(__name__)
DELIVERY_JOB_ID = "portal-deliver-outbox"


def enqueue_delivery() -> None:
    """Queue one run of the outbox's delivery (a burst of crossings is one job)."""
    from portal.queue import queue

    queue("default").enqueue("jobs.alerts.deliver_outbox", job_id=DELIVERY_JOB_ID, result_ttl=600)


def evaluate_and_queue(invoice_id: int) -> int:
    """Evaluate the invoice's alerts and commit; queue the mails' delivery if any
    crossing was recorded. Inside an app context. Returns how many were recorded."""
    from portal.billing.alerts import evaluate_alerts
    from portal.extensions import db

    crossings = evaluate_alerts(invoice_id)
    db.session.commit()
    if crossings:
        enqueue_delivery()
    return len(crossings)


def evaluate_invoice_alerts(invoice_id: int) -> dict:
    with get_app().app_context():
        return {"crossings": evaluate_and_queue(invoice_id)}


def deliver_outbox() -> dict:
    """Send the outbox's unsent mails through SMTP (nothing when SMTP is not configured)."""
    from portal.mail import deliver_outbox as deliver

    with get_app().app_context():
        return deliver().as_dict()
