"""Two rqscheduler processes against one Redis: each periodic job once per tick."""
from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from rq import Queue
from rq_scheduler import Scheduler

from portal.queue import redis_connection


def test_two_schedulers_enqueue_each_tick_once(app, redis_url):
    redis = redis_connection()
    interval = 2
    Scheduler(connection=redis).schedule(
        scheduled_time=datetime.now(timezone.utc), func="jobs.sync.sweep_unsynced", interval=interval, repeat=None,
        id="portal-probe", queue_name="default",
    )
    scheduler_bin = str(Path(sys.executable).parent / "rqscheduler")
    schedulers = [subprocess.Popen([scheduler_bin, "--url", redis_url, "--interval", "0.5"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    started = time.monotonic()
    try:
        time.sleep(9)
    finally:
        for process in schedulers:
            process.terminate()
        for process in schedulers:
            process.wait(timeout=10)
    elapsed = time.monotonic() - started
    enqueued = Queue("default", connection=redis).count
    ticks = elapsed / interval
    assert 2 <= enqueued <= ticks + 1, f"{enqueued} jobs for about {ticks:.1f} ticks"
