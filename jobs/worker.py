"""Worker classes: `rq worker -w jobs.worker.PortalWorker sync webhooks default`.

`PortalWorker` runs jobs in the worker process itself, with the app built and what
jobs import loaded once, so a sync job costs its own work only (about four times
the job rate of a fork per job on two cores). RQ's timeouts still end a job (SIGALRM
raises inside it; nothing it half did is committed, and its invoice lock has a
lease). `PortalForkingWorker` runs each job in a forked work horse that the parent
kills when it outlives its timeout, for jobs that might hang where a signal cannot
reach them; it costs a fork and fresh connections per job.
"""
from __future__ import annotations

from rq.worker import SimpleWorker, Worker

from jobs.app import get_app


def _warm_up() -> None:
    """Build the app and import what jobs use, once, in the worker process."""
    get_app()
    from sqlalchemy.orm import configure_mappers

    import jobs.sync  # noqa: F401
    import portal.billing.sync  # noqa: F401
    from portal.stripe_gateway import warm_up

    configure_mappers()
    warm_up()


class PortalWorker(SimpleWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _warm_up()


class PortalForkingWorker(Worker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _warm_up()

    def main_work_horse(self, job, queue):
        from portal.extensions import db

        # The horse must not use the parent's database connections.
        with get_app().app_context():
            db.engine.dispose(close=False)
        super().main_work_horse(job, queue)
