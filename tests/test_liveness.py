"""Liveness: a locked invoice never holds a worker, sweeps never wait behind a backlog,
and a Redis restart heals without an operator (real worker and scheduler processes,
a Redis server of the test's own that is really stopped and started again)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

from rq import Queue, SimpleWorker
from rq_scheduler import Scheduler
from sqlalchemy import select

from jobs.app import use_app
from portal.billing.pricing import add_quantity
from portal.billing.sync_queue import enqueue_close, enqueue_sync
from portal.locks import invoice_lock
from portal.models import Invoice, SyncRun
from portal.queue import redis_connection
from tests.services import RedisServer, free_port
from tests.sync_helpers import assert_stripe_matches_portal

ROOT = Path(__file__).resolve().parent.parent


def _invoice_with_usage(db, make, slug="acme", ended=False):
    from datetime import datetime, timedelta, timezone

    organization = make.organization(slug=slug)
    product = make.product(f"egress.{slug}", unit_price="200", name="Egress")
    at = datetime.now(timezone.utc) - timedelta(days=40) if ended else None
    invoice = make.open_invoice(organization, at=at)
    add_quantity(invoice, product, "", Decimal("2"))
    db.session.commit()
    invoice_id = invoice.id
    db.session.commit()  # no transaction left open: on SQLite it would hold the write lock
    return invoice_id


def _burst(*queues: str, max_jobs: int | None = None) -> None:
    redis = redis_connection()
    SimpleWorker([Queue(name, connection=redis) for name in queues], connection=redis).work(
        burst=True, max_jobs=max_jobs)


def test_a_sync_job_that_finds_the_invoice_locked_ends_at_once(db, app, make, stripe_emulator):
    use_app(app)
    invoice_id = _invoice_with_usage(db, make)
    with invoice_lock(invoice_id) as held:
        assert held is not None
        job_id = enqueue_sync(invoice_id, trigger="manual")
        started = time.monotonic()
        _burst("sync")
        assert time.monotonic() - started < 2  # not the lock's 30 s, nor any wait
    job = Queue("sync", connection=redis_connection()).fetch_job(job_id)
    assert job.return_value()["outcome"] == "locked"


def test_the_lock_holder_queues_a_sync_for_changes_made_while_it_worked(db, app, make, stripe_emulator):
    use_app(app)
    invoice_id = _invoice_with_usage(db, make)
    stripe_emulator.control.set_faults(rules=[{"kind": "latency", "path": "*/add_lines", "latency_ms": 1500}])
    enqueue_sync(invoice_id)
    import threading

    worker = threading.Thread(target=lambda: _run_in(app, lambda: _burst("sync", max_jobs=1)))
    worker.start()
    time.sleep(0.8)  # the job holds the lock, its add_lines in flight
    invoice = db.session.get(Invoice, invoice_id)
    add_quantity(invoice, invoice.items[0].product, "late", Decimal("1"))
    db.session.commit()
    enqueue_sync(invoice_id)  # the job this change asks for finds the invoice locked ...
    worker.join()
    stripe_emulator.control.clear_faults()
    assert Queue("sync", connection=redis_connection()).count == 1  # ... and one is waiting all the same
    _burst("sync")
    db.session.rollback()
    assert not db.session.get(Invoice, invoice_id).has_unsynced_changes
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)


def _run_in(app, work):
    with app.app_context():
        work()


def test_a_close_that_finds_the_invoice_locked_runs_again_shortly(db, app, make, stripe_emulator):
    use_app(app)
    invoice_id = _invoice_with_usage(db, make, ended=True)
    redis = redis_connection()
    with invoice_lock(invoice_id) as held:
        assert held is not None
        assert enqueue_close(invoice_id) == enqueue_close(invoice_id)  # one close job per invoice
        started = time.monotonic()
        _burst("default")
        assert time.monotonic() - started < 3
    job = Queue("default", connection=redis).fetch_job(f"portal-close-{invoice_id}")
    assert job.return_value().startswith("deferred 5 s")
    scheduler = Scheduler(queue_name="default", connection=redis)
    assert redis.zscore(scheduler.scheduled_jobs_key, f"portal-close-{invoice_id}") is not None
    time.sleep(5.2)
    scheduler.enqueue_jobs()  # what the scheduler process does on its next tick
    _burst("default")
    db.session.rollback()
    assert db.session.get(Invoice, invoice_id).status == "finalized"


def test_sweeps_run_before_a_backlog_of_other_jobs(db, app):
    use_app(app)
    redis = redis_connection()
    for n in range(50):
        Queue("webhooks", connection=redis).enqueue("jobs.webhooks.process_stripe_event", 10_000 + n)
        Queue("sync", connection=redis).enqueue("jobs.sync.sync_invoice", 10_000 + n)
    sweep = Queue("sweeps", connection=redis).enqueue("jobs.sync.sweep_unsynced")
    _burst("sweeps", "sync", "webhooks", "default", max_jobs=1)
    assert sweep.get_status(refresh=True) == "finished"
    assert Queue("webhooks", connection=redis).count == 50 and Queue("sync", connection=redis).count == 50


def test_a_redis_restart_heals_without_an_operator(db, app, make, stripe_emulator, database_uri, tmp_path):
    """Worker and scheduler as real processes on a Redis of this test's own, which is
    stopped (everything in it lost) and started again on the same port."""
    port = free_port()
    for name in ("redis-a", "redis-b"):
        (tmp_path / name).mkdir()
    server = RedisServer(tmp_path / "redis-a", port)
    redis_url = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "DATABASE_URL": database_uri, "REDIS_URL": redis_url, "SECRET_KEY": "x",
           "STRIPE_API_KEY": stripe_emulator.api_key, "STRIPE_API_BASE": stripe_emulator.url,
           "SYNC_INTERVAL_SECONDS": "1", "CLOSE_INTERVAL_SECONDS": "3600"}
    bin_dir = Path(sys.executable).parent
    logs = (tmp_path / "worker.log").open("w"), (tmp_path / "scheduler.log").open("w")
    subprocess.run([str(bin_dir / "flask"), "--app", "wsgi", "schedule"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    worker = subprocess.Popen([str(bin_dir / "rq"), "worker", "-w", "jobs.worker.PortalWorker", "sweeps", "sync",
                               "webhooks", "default", "--url", redis_url], cwd=ROOT, env=env, stdout=logs[0],
                              stderr=subprocess.STDOUT)
    scheduler = subprocess.Popen([sys.executable, "-m", "jobs.scheduler", "--interval", "0.5"], cwd=ROOT, env=env,
                                 stdout=logs[1], stderr=subprocess.STDOUT)
    try:
        first = _invoice_with_usage(db, make, "first")
        _wait_until_synced(db, first, 20, tmp_path)
        server.stop()  # Redis goes away with every job, schedule and lock in it
        time.sleep(3)
        assert worker.poll() is None and scheduler.poll() is None, _logs(tmp_path)
        server = RedisServer(tmp_path / "redis-b", port)  # back, empty
        second = _invoice_with_usage(db, make, "second")
        _wait_until_synced(db, second, 30, tmp_path)  # nobody ran `flask schedule` again
        assert worker.poll() is None and scheduler.poll() is None, _logs(tmp_path)
        assert "registered again" in (tmp_path / "scheduler.log").read_text()
    finally:
        for process in (worker, scheduler):
            process.terminate()
        for process in (worker, scheduler):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        server.stop()
        for log in logs:
            log.close()
    assert scheduler.returncode == 0  # SIGTERM ends it cleanly


def _wait_until_synced(db, invoice_id: int, seconds: float, tmp_path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        synced = db.session.scalar(select(SyncRun.id).where(SyncRun.invoice_id == invoice_id,
                                                            SyncRun.outcome == "synced"))
        db.session.rollback()  # hold no transaction while the worker works (SQLite's write lock)
        if synced:
            return
        time.sleep(0.2)
    raise AssertionError(f"invoice {invoice_id} not synced within {seconds} s\n{_logs(tmp_path)}")


def _logs(tmp_path) -> str:
    return "\n".join(f"--- {name}\n{(tmp_path / name).read_text()[-3000:]}"
                     for name in ("worker.log", "scheduler.log"))
