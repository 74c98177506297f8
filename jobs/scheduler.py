"""The scheduler process: `python -m jobs.scheduler [--interval 5]` (REDIS_URL and the
rest from the environment, like every portal process).

rq-scheduler's `Scheduler` does the work (one active at a time across processes: it
takes a lock each tick), with two differences from the `rqscheduler` command:

- it outlives Redis: a connection error (Redis restarting, a failover) is waited out
  and the loop carries on, where `rqscheduler` exits;
- every tick it checks that the portal's periodic jobs are registered and registers
  the missing ones (a Redis restarted without persistence has lost them), so the
  sweeps come back on their own, with no operator running `flask schedule`.
"""
from __future__ import annotations

import argparse
import logging
import signal
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq_scheduler import Scheduler

from jobs.app import get_app
from portal.schedule import periodic_job_definitions, schedule_periodic_jobs

log = logging.getLogger("portal.scheduler")

RECONNECT_SECONDS = 1.0
MAX_RECONNECT_SECONDS = 10.0


class PortalScheduler(Scheduler):
    def __init__(self, *args, portal_config, **kwargs):
        super().__init__(*args, **kwargs)
        self.portal_config = portal_config
        self.wanted_ids = [job.job_id for job in periodic_job_definitions(portal_config)]
        self.reregistered = 0
        self.stopping = False

    def _install_signal_handlers(self):
        """SIGINT/SIGTERM end the process, also while Redis is down (rq-scheduler's own
        handler would fail on its way out and the loop would carry on)."""
        def stop(signum, frame):
            self.stopping = True
            try:
                self.remove_lock()
                self.register_death()
            except (RedisConnectionError, RedisTimeoutError):
                pass
            raise SystemExit(0)

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)

    def enqueue_jobs(self):
        self.ensure_periodic_jobs()
        return super().enqueue_jobs()

    def ensure_periodic_jobs(self) -> bool:
        """Register the periodic jobs if any is missing; True if it had to."""
        pipeline = self.connection.pipeline()
        for job_id in self.wanted_ids:
            pipeline.zscore(self.scheduled_jobs_key, job_id)
        if all(score is not None for score in pipeline.execute()):
            return False
        report = schedule_periodic_jobs(self.connection, self.portal_config)
        self.reregistered += 1
        log.warning("periodic jobs were missing from Redis (restarted?); registered again: %s", report["added"])
        return True


def run(interval: float) -> None:
    app = get_app()
    wait = RECONNECT_SECONDS
    with app.app_context():
        redis = app.extensions["redis"]
        while True:
            scheduler = PortalScheduler(connection=redis, interval=interval, portal_config=app.config)
            try:
                scheduler.run()
                return
            except (RedisConnectionError, RedisTimeoutError) as error:
                if scheduler.stopping:
                    return
                log.warning("Redis unavailable (%s); retrying in %.0f s", error, wait)
                time.sleep(wait)
                wait = min(wait * 2, MAX_RECONNECT_SECONDS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between ticks (default 5)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run(args.interval)


if __name__ == "__main__":
    main()
