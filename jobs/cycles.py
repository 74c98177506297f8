"""End-of-cycle jobs: thin wrappers around `portal.billing.closing`. Safe to run twice."""
from __future__ import annotations

from jobs.app import get_app


def close_cycle(invoice_id: int, end_now: bool = False) -> str:
    from portal.billing.closing import close_cycle as close

    with get_app().app_context():
        return close(invoice_id, end_now=end_now)


def close_due_cycles() -> dict:
    """Enqueue the close of every invoice whose period has ended (and of closes that
    stopped half-way)."""
    from portal.billing.closing import due_invoice_ids
    from portal.queue import queue

    with get_app().app_context():
        ids = due_invoice_ids()
        for invoice_id in ids:
            queue("default").enqueue("jobs.cycles.close_cycle", invoice_id, job_timeout=600)
        return {"enqueued": len(ids)}


def refresh_invoice_from_stripe(invoice_id: int) -> str:
    """Apply the Stripe invoice's state (after a sync found it finalized)."""
    from portal.billing.closing import refresh_from_stripe

    with get_app().app_context():
        return refresh_from_stripe(invoice_id)
