"""End-of-cycle jobs: thin wrappers around `portal.billing.closing`. Safe to run twice."""
from __future__ import annotations

from jobs.app import get_app


def close_cycle(invoice_id: int, end_now: bool = False) -> str:
    """Close one invoice. Finding it locked (a sync or close of it is running) does
    not hold this worker: the close runs again a few seconds later."""
    from portal.billing.closing import CloseDeferred
    from portal.billing.closing import close_cycle as close
    from portal.billing.sync_queue import CLOSE_RETRY_SECONDS, enqueue_close

    with get_app().app_context():
        try:
            return close(invoice_id, end_now=end_now, wait_seconds=0)
        except CloseDeferred as deferred:
            enqueue_close(invoice_id, end_now, delay_seconds=CLOSE_RETRY_SECONDS)
            return f"deferred {CLOSE_RETRY_SECONDS} s: {deferred}"


def close_due_cycles() -> dict:
    """Enqueue the close of every invoice whose period has ended (and of closes that
    stopped half-way): one job per invoice, however often the sweep runs."""
    from portal.billing.closing import due_invoice_ids
    from portal.billing.sync_queue import enqueue_close

    with get_app().app_context():
        ids = due_invoice_ids()
        for invoice_id in ids:
            enqueue_close(invoice_id)
        return {"enqueued": len(ids)}


def refresh_invoice_from_stripe(invoice_id: int) -> str:
    """Apply the Stripe invoice's state (after a sync found it finalized)."""
    from portal.billing.closing import refresh_from_stripe

    with get_app().app_context():
        return refresh_from_stripe(invoice_id)
