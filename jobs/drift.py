"""The periodic drift sweep: a thin wrapper around `portal.billing.drift`. Safe to run twice."""
from __future__ import annotations

from jobs.app import get_app


def sweep_drift() -> dict:
    """Compare the next DRIFT_SWEEP_BATCH open invoices with their Stripe drafts and
    record what each shows (the admin front page counts what was found)."""
    from portal.billing.drift import sweep_drift as sweep

    app = get_app()
    with app.app_context():
        return sweep(batch=app.config["DRIFT_SWEEP_BATCH"])
