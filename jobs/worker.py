"""Worker classes: `rq worker -w jobs.worker.PortalWorker sweeps sync webhooks default`
(the queues in that order: the periodic sweeps first, never behind a backlog).

`PortalWorker` runs jobs in the worker process itself, with the app built and what
jobs import loaded once, so a sync job costs its own work only (about four times
the job rate of a fork per job on two cores). RQ's timeouts still end a job (SIGALRM
raises inside it; nothing it half did is committed, and its invoice lock has a
lease). `PortalForkingWorker` runs each job in a forked work horse that the parent
kills when it outlives its timeout, for jobs that might hang where a signal cannot
reach them; it costs a fork and fresh connections per job.
"""
from __future__ import annotations

import logging
import time
from uuid import uuid4

from redis.exceptions import RedisError
from rq.worker import SimpleWorker, Worker

from jobs.app import get_app

log = logging.getLogger("portal.worker")
REDIS_BACK_SECONDS = 2.0


class _OutlivesRedis:
    """RQ waits out a Redis outage while it waits for a job, but quits when Redis
    goes away at another moment (finishing a job, a heartbeat). This worker starts
    its loop again once Redis answers, instead of leaving the queue unserved."""

    def work(self, burst: bool = False, *args, **kwargs):
        while True:
            try:
                result = super().work(burst, *args, **kwargs)
            except RedisError as error:  # lost between jobs, even registering
                log.warning("worker %s: Redis unavailable: %s", self.name, error)
                result = False
            # SIGTERM/SIGINT while idle ends RQ's loop without _stop_requested (RQ
            # raises StopRequested at once); its shutdown date says it was asked to stop.
            stop_asked = self._stop_requested or self._shutdown_requested_date is not None
            if burst or stop_asked or kwargs.get("max_jobs") or kwargs.get("max_idle_time"):
                return result
            # RQ quit on its own: Redis went away (or a loop error it does not handle).
            log.warning("worker %s: the work loop ended; serving again once Redis answers", self.name)
            time.sleep(REDIS_BACK_SECONDS)
            while not self._redis_answers():
                time.sleep(REDIS_BACK_SECONDS)
            self._stop_requested = False
            self.name = uuid4().hex  # its old registration may not have been cleared

    def _redis_answers(self) -> bool:
        try:
            return bool(self.connection.ping())
        except RedisError:
            return False


def _warm_up() -> None:
    """Build the app and import what jobs use, once, in the worker process."""
    get_app()
    from sqlalchemy.orm import configure_mappers

    import jobs.sync  # noqa: F401
    import portal.billing.sync  # noqa: F401
    from portal.stripe_gateway import warm_up

    configure_mappers()
    warm_up()


class PortalWorker(_OutlivesRedis, SimpleWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _warm_up()


class PortalForkingWorker(_OutlivesRedis, Worker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _warm_up()

    def main_work_horse(self, job, queue):
        from portal.extensions import db

        # The horse must not use the parent's database connections.
        with get_app().app_context():
            db.engine.dispose(close=False)
        super().main_work_horse(job, queue)
