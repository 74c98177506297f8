"""Enqueueing syncs and closes, deduplicated: while a sync of an invoice is queued and
not yet started, asking again returns that job instead of queueing another, so a
burst of "sync now" clicks or sweeps is one job. The marker is cleared when the job
starts, so a change made while a sync runs gets a sync of its own. A close has one
job per invoice (a fixed id) while it waits.

Enqueue after the commit that made the change: the database is the truth and the
queue only a hint; a lost job is repaired by the next sweep.
"""
from __future__ import annotations

from uuid import uuid4

from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from portal.queue import redis_connection

SYNC_JOB = "jobs.sync.sync_invoice"
SYNC_JOB_TIMEOUT_SECONDS = 300
PENDING_TTL_SECONDS = 3600
_WAITING = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED)


def _pending_key(invoice_id: int) -> str:
    return f"portal:sync:pending:{invoice_id}"


def _waiting_job(redis, job_id: bytes | None) -> str | None:
    if not job_id:
        return None
    try:
        job = Job.fetch(job_id.decode(), connection=redis)
    except NoSuchJobError:
        return None
    return job.id if job.get_status() in _WAITING else None


def enqueue_sync(invoice_id: int, trigger: str = "manual") -> str:
    """Queue a sync of the invoice, or return the id of the one already waiting."""
    redis = redis_connection()
    key = _pending_key(invoice_id)
    waiting = _waiting_job(redis, redis.get(key))
    if waiting:
        return waiting
    # Enqueue first, then claim the marker: a marker always names a job that exists.
    job = Queue("sync", connection=redis).enqueue(
        SYNC_JOB, invoice_id, trigger, job_id=uuid4().hex, job_timeout=SYNC_JOB_TIMEOUT_SECONDS,
        result_ttl=86400, failure_ttl=7 * 86400,
    )
    if redis.set(key, job.id, nx=True, ex=PENDING_TTL_SECONDS):
        return job.id
    waiting = _waiting_job(redis, redis.get(key))
    if waiting:  # a concurrent request won: keep its job, drop ours
        job.cancel()
        job.delete()
        return waiting
    redis.set(key, job.id, ex=PENDING_TTL_SECONDS)  # the marker was stale
    return job.id


def sync_started(invoice_id: int) -> None:
    """Called by the job as it starts: later requests queue a new sync."""
    redis_connection().delete(_pending_key(invoice_id))


# --- closes -----------------------------------------------------------------------

CLOSE_JOB = "jobs.cycles.close_cycle"
CLOSE_JOB_TIMEOUT_SECONDS = 600
# A close that finds the invoice locked runs again this much later (the lock's
# holder is a sync or close that ends within seconds) instead of holding a worker.
CLOSE_RETRY_SECONDS = 5


def _close_job_id(invoice_id: int) -> str:
    return f"portal-close-{invoice_id}"


def enqueue_close(invoice_id: int, end_now: bool = False, delay_seconds: float = 0) -> str:
    """Queue the close of the invoice (now, or in `delay_seconds`), unless one is
    waiting already: one close job per invoice at a time, however many sweeps,
    clicks or retries ask."""
    from datetime import timedelta

    from rq_scheduler import Scheduler

    redis = redis_connection()
    job_id = _close_job_id(invoice_id)
    scheduler = Scheduler(queue_name="default", connection=redis)
    waiting = _waiting_job(redis, job_id.encode()) or (
        job_id if redis.zscore(scheduler.scheduled_jobs_key, job_id) is not None else None)
    if waiting and not end_now:
        return waiting
    if waiting:  # "close now" replaces a waiting close of the usual end
        redis.zrem(scheduler.scheduled_jobs_key, job_id)
        Job.fetch(waiting, connection=redis).cancel()
    if delay_seconds:
        scheduler.enqueue_in(
            timedelta(seconds=delay_seconds), CLOSE_JOB, invoice_id, end_now, job_id=job_id,
            queue_name="default", timeout=CLOSE_JOB_TIMEOUT_SECONDS)
        return job_id
    return Queue("default", connection=redis).enqueue(
        CLOSE_JOB, invoice_id, end_now, job_id=job_id, job_timeout=CLOSE_JOB_TIMEOUT_SECONDS,
        result_ttl=86400, failure_ttl=7 * 86400).id
