"""Periodic jobs, as a list of definitions scheduled idempotently with rq-scheduler.

Each job's id is fixed by its definition, so registering twice (or from two
machines) schedules each job once; definitions that changed are replaced and
`portal-` jobs no longer defined are removed.
"""
from __future__ import annotations

from dataclasses import dataclass

from rq_scheduler import Scheduler

JOB_PREFIX = "portal-"


@dataclass(frozen=True)
class PeriodicJob:
    name: str
    func: str
    interval_seconds: int
    queue: str = "sweeps"  # first in every worker's list: never behind a backlog
    timeout_seconds: int = 120

    @property
    def job_id(self) -> str:
        return f"{JOB_PREFIX}{self.name}-every-{self.interval_seconds}s-on-{self.queue}"


def periodic_job_definitions(config) -> list[PeriodicJob]:
    return [
        PeriodicJob("sweep-unsynced", "jobs.sync.sweep_unsynced", config["SYNC_INTERVAL_SECONDS"]),
        PeriodicJob("close-due-cycles", "jobs.cycles.close_due_cycles", config["CLOSE_INTERVAL_SECONDS"]),
        # Events whose job was lost (a worker killed, Redis restarted) wait for this.
        PeriodicJob("sweep-stored-events", "jobs.webhooks.sweep_stored_events",
                    min(60, config["SYNC_INTERVAL_SECONDS"])),
        PeriodicJob("prune-stripe-writes", "jobs.housekeeping.prune_stripe_writes", 3600, queue="default",
                    timeout_seconds=600),
        # Reads Stripe: a bounded batch per run, from the shared request budget.
        PeriodicJob("sweep-drift", "jobs.drift.sweep_drift", config["DRIFT_SWEEP_INTERVAL_SECONDS"],
                    timeout_seconds=max(120, 6 * config["DRIFT_SWEEP_BATCH"])),
        # Mails left unsent (SMTP away or configured late) go out with this; on `default`,
        # so a slow SMTP server never holds up the sweeps.
        PeriodicJob("deliver-outbox", "jobs.alerts.deliver_outbox", 60, queue="default"),
    ]


def schedule_periodic_jobs(redis, config) -> dict[str, list[str]]:
    """Register the periodic jobs; returns what was added, kept and removed."""
    from datetime import datetime, timezone

    scheduler = Scheduler(queue_name="default", connection=redis)
    wanted = {job.job_id: job for job in periodic_job_definitions(config)}
    existing = {job.id for job in scheduler.get_jobs() if job.id.startswith(JOB_PREFIX)}
    report = {"added": [], "kept": sorted(existing & set(wanted)), "removed": []}
    for job_id in sorted(existing - set(wanted)):
        scheduler.cancel(job_id)
        report["removed"].append(job_id)
    for job_id, job in wanted.items():
        if job_id in existing:
            continue
        scheduler.schedule(
            scheduled_time=datetime.now(timezone.utc), func=job.func, interval=job.interval_seconds,
            repeat=None, id=job_id, queue_name=job.queue, timeout=job.timeout_seconds, result_ttl=3600,
        )
        report["added"].append(job_id)
    return report
