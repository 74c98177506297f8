"""Housekeeping: records that only grow, pruned on a schedule."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select

from jobs.app import get_app

PRUNE_BATCH = 5_000


def prune_stripe_writes(keep_days: int | None = None) -> dict:
    """Delete Stripe write records older than STRIPE_WRITES_KEEP_DAYS, in batches so
    no long transaction holds the table. The sync's hold-off reads only the last
    minute of them; support reads them on an invoice's page."""
    from portal.extensions import db
    from portal.models import StripeWrite
    from portal.models.types import utcnow

    app = get_app()
    with app.app_context():
        days = keep_days if keep_days is not None else app.config["STRIPE_WRITES_KEEP_DAYS"]
        cutoff = utcnow() - timedelta(days=days)
        deleted = 0
        while True:
            ids = db.session.scalars(select(StripeWrite.id).where(StripeWrite.started_at < cutoff)
                                     .order_by(StripeWrite.id).limit(PRUNE_BATCH)).all()
            if not ids:
                break
            db.session.execute(delete(StripeWrite).where(StripeWrite.id.in_(ids)))
            db.session.commit()
            deleted += len(ids)
        db.session.commit()
        return {"deleted": deleted, "older_than": cutoff.isoformat()}
