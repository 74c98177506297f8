"""Sync jobs: thin wrappers around `portal.billing.sync`. Safe to run twice."""
from __future__ import annotations

from rq import get_current_job

from jobs.app import get_app


def sync_invoice(invoice_id: int, trigger: str = "manual") -> dict:
    """Sync one invoice with Stripe; the result is the SyncRun's outcome and counts."""
    from portal.billing.sync import sync_invoice as run_sync
    from portal.billing.sync_queue import sync_started

    job = get_current_job()
    with get_app().app_context():
        sync_started(invoice_id)
        run = run_sync(invoice_id, trigger=trigger, job_id=job.id if job else None)
        if run.outcome == "stripe_invoice_finalized":
            # Finalized behind the portal's back: the end-of-cycle logic takes over.
            from portal.queue import queue

            queue("default").enqueue("jobs.cycles.refresh_invoice_from_stripe", invoice_id)
        return {"sync_run": run.id, "outcome": run.outcome, "created": run.created, "updated": run.updated,
                "deleted": run.deleted, "unchanged": run.unchanged, "stripe_calls": run.stripe_calls,
                "error": run.error}


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
