"""Sync jobs: thin wrappers around `portal.billing.sync`. Safe to run twice."""
from __future__ import annotations

import logging

from rq import get_current_job

from jobs.app import get_app

log = logging.getLogger(__name__)


def sync_invoice(invoice_id: int, trigger: str = "manual") -> dict:
    """Sync one invoice with Stripe; the result is the SyncRun's outcome and counts.

    An invoice locked by another sync is not waited for (`locked`: the job ends at
    once): the holder, once it has released the lock, queues a sync of its own for
    any change that arrived while it worked."""
    from portal.billing.sync import sync_invoice as run_sync
    from portal.billing.sync_queue import enqueue_sync, sync_started
    from portal.extensions import db
    from portal.models import Invoice

    job = get_current_job()
    with get_app().app_context():
        sync_started(invoice_id)
        run = run_sync(invoice_id, trigger=trigger, job_id=job.id if job else None, wait_seconds=0)
        if run.outcome in ("synced", "unchanged"):
            invoice = db.session.get(Invoice, invoice_id, populate_existing=True)
            if invoice is not None and invoice.has_unsynced_changes and invoice.status in ("open", "closing"):
                enqueue_sync(invoice_id, trigger=trigger)
            db.session.commit()
        if run.outcome == "stripe_invoice_finalized":
            # Finalized behind the portal's back: the end-of-cycle logic takes over.
            from portal.queue import queue

            queue("default").enqueue("jobs.cycles.refresh_invoice_from_stripe", invoice_id,
                                     job_id=f"portal-refresh-{invoice_id}")
        _evaluate_alerts(invoice_id)
        return {"sync_run": run.id, "outcome": run.outcome, "created": run.created, "updated": run.updated,
                "deleted": run.deleted, "unchanged": run.unchanged, "stripe_calls": run.stripe_calls,
                "error": run.error}


def _evaluate_alerts(invoice_id: int) -> None:
    """Spend alerts follow the figures this sync carried (the usage ingested since the
    last one), whatever Stripe answered; ingest itself never waits for them. A failure
    here is logged and never fails the sync."""
    from redis.exceptions import RedisError
    from sqlalchemy.exc import SQLAlchemyError

    from portal.billing.alerts import evaluate_and_queue
    from portal.extensions import db

    try:
        evaluate_and_queue(invoice_id)
    except (SQLAlchemyError, RedisError):
        db.session.rollback()
        log.exception("spend alerts of invoice %s were not evaluated", invoice_id)


def sweep_unsynced() -> dict:
    """Enqueue a sync for every invoice with changes not yet at Stripe. Work follows
    change: an invoice without unsynced changes costs nothing here."""
    from portal.billing.sync import unsynced_invoice_ids
    from portal.billing.sync_queue import enqueue_sync

    with get_app().app_context():
        ids = unsynced_invoice_ids()
        for invoice_id in ids:
            enqueue_sync(invoice_id, trigger="schedule")
        return {"enqueued": len(ids)}
