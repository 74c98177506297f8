"""Records that only grow are pruned on a schedule, and only the old ones."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from jobs.app import use_app
from jobs.housekeeping import prune_stripe_writes
from portal.models import StripeWrite
from portal.models.types import utcnow
from portal.schedule import periodic_job_definitions


def _write(db, key: str, age: timedelta, outcome: str | None = "applied") -> None:
    db.session.add(StripeWrite(idempotency_key=key, operation="add_lines", invoice_id=1,
                               started_at=utcnow() - age, outcome=outcome))


def test_stripe_write_records_older_than_the_keep_period_are_deleted(db, app, monkeypatch):
    use_app(app)
    monkeypatch.setitem(app.config, "STRIPE_WRITES_KEEP_DAYS", 30)
    _write(db, "old-applied", timedelta(days=31))
    _write(db, "old-unanswered", timedelta(days=45), outcome=None)
    _write(db, "recent", timedelta(days=29))
    _write(db, "just-now", timedelta(seconds=1), outcome=None)
    db.session.commit()
    result = prune_stripe_writes()
    assert result["deleted"] == 2
    db.session.rollback()
    assert sorted(db.session.scalars(select(StripeWrite.idempotency_key))) == ["just-now", "recent"]
    db.session.rollback()  # hold no transaction (on SQLite, the write lock) while the job runs
    assert prune_stripe_writes()["deleted"] == 0  # nothing more to do, and safe to run again


def test_pruning_goes_in_batches(db, app, monkeypatch):
    import jobs.housekeeping

    use_app(app)
    monkeypatch.setattr(jobs.housekeeping, "PRUNE_BATCH", 3)
    for n in range(7):
        _write(db, f"old-{n}", timedelta(days=100))
    db.session.commit()
    assert prune_stripe_writes(keep_days=90)["deleted"] == 7
    db.session.rollback()
    assert db.session.scalar(select(StripeWrite.id)) is None


def test_pruning_is_scheduled_hourly(app):
    job = next(job for job in periodic_job_definitions(app.config) if job.name == "prune-stripe-writes")
    assert (job.func, job.interval_seconds) == ("jobs.housekeeping.prune_stripe_writes", 3600)
