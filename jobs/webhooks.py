"""Stripe event jobs: thin wrappers around `portal.billing.events`. Safe to run twice."""
from __future__ import annotations

from jobs.app import get_app


def process_stripe_event(row_id: int) -> str:
    from portal.billing.events import process_event

    with get_app().app_context():
        return process_event(row_id)


def sweep_stored_events() -> dict:
    """Enqueue processing for stored events whose job was lost (Redis down at
    delivery, a restart) or failed; each is retried until MAX_ATTEMPTS."""
    from portal.billing.events import enqueue_processing, unprocessed_event_ids

    with get_app().app_context():
        ids = unprocessed_event_ids()
        for row_id in ids:
            enqueue_processing(row_id)
        return {"enqueued": len(ids)}
