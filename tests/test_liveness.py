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

import redis as redis_lib
from rq import Queue, SimpleWorker
from rq_scheduler import Scheduler
from sqlalchemy import select

import portal.billing.sync
from jobs.app import use_app
from portal.billing.pricing import add_quantity
from portal.billing.sync import sync_invoice
from portal.billing.sync_queue import enqueue_close, enqueue_sync
from portal.locks import invoice_lock
from portal.models import Invoice, SyncRun
from portal.queue import QUEUE_NAMES, redis_connection
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
    import threading

    from jobs.sync import sync_invoice as sync_job

    use_app(app)
    invoice_id = _invoice_with_usage(db, make)
    stripe_emulator.control.set_faults(rules=[{"kind": "latency", "path": "*/add_lines", "latency_ms": 1500}])
    results = {}
    holder = threading.Thread(target=lambda: results.update(holder=sync_job(invoice_id, "manual")))
    holder.start()
    time.sleep(0.8)  # the holder has the lock, its add_lines in flight
    invoice = db.session.get(Invoice, invoice_id)
    add_quantity(invoice, invoice.items[0].product, "late", Decimal("1"))
    db.session.commit()
    started = time.monotonic()
    assert sync_job(invoice_id, "manual")["outcome"] == "locked"  # the job this change asked for ...
    assert time.monotonic() - started < 1  # ... ends at once
    holder.join()
    stripe_emulator.control.clear_faults()
    assert results["holder"]["outcome"] == "synced"
    assert Queue("sync", connection=redis_connection()).count == 1  # the holder queued the follow-up
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


def test_sweeps_run_before_thousands_of_queued_event_jobs(db, app):
    use_app(app)
    redis = redis_connection()
    for queue_name, func in (("webhooks", "jobs.webhooks.process_stripe_event"), ("sync", "jobs.sync.sync_invoice")):
        Queue(queue_name, connection=redis).enqueue_many(
            [Queue.prepare_data(func, (10_000 + n,)) for n in range(2000)])
    sweep = Queue("sweeps", connection=redis).enqueue("jobs.sync.sweep_unsynced")
    _burst(*QUEUE_NAMES, max_jobs=1)  # the order every worker serves them in
    assert sweep.get_status(refresh=True) == "finished"
    assert Queue("webhooks", connection=redis).count == 2000 and Queue("sync", connection=redis).count == 2000


def test_a_lock_holder_killed_mid_sync_frees_the_invoice_within_one_lease(db, app, make, stripe_emulator,
                                                                         database_uri, redis_url, monkeypatch):
    invoice_id = _invoice_with_usage(db, make)
    lease = 2
    monkeypatch.setattr(portal.billing.sync, "WRITE_SETTLE_SECONDS", lease)  # settles within the short lease
    env = {**os.environ, "DATABASE_URL": database_uri, "REDIS_URL": redis_url, "SECRET_KEY": "x",
           "STRIPE_API_KEY": stripe_emulator.api_key, "STRIPE_API_BASE": stripe_emulator.url,
           "PORTAL_LOCK_LEASE_SECONDS": str(lease)}
    stripe_emulator.control.set_faults(rules=[{"kind": "latency", "path": "*/add_lines", "latency_ms": 5000}])
    holder = subprocess.Popen([str(Path(sys.executable).parent / "flask"), "--app", "wsgi", "sync", "--invoice",
                               str(invoice_id), "--now"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    key = f"portal:lock:invoice:{invoice_id}"
    redis = redis_connection()
    deadline = time.monotonic() + 20
    # The draft created, its add_lines (held 5 s by Stripe) is next.
    while not any(r["path"] == "/v1/invoices" and r["method"] == "POST"
                  for r in stripe_emulator.control.requests_log()):
        assert time.monotonic() < deadline and holder.poll() is None, "the sync never created its draft"
        time.sleep(0.02)
    time.sleep(lease * 1.5)
    assert redis.exists(key)  # a live holder keeps it past its lease: renewed
    holder.kill()  # mid-sync, lock held, add_lines in flight
    holder.wait()
    killed_at = time.monotonic()
    while redis.exists(key):
        assert time.monotonic() - killed_at < lease + 0.5, "the dead holder's lock outlived its lease"
        time.sleep(0.05)
    freed_after = time.monotonic() - killed_at
    assert freed_after <= lease + 0.5
    stripe_emulator.control.clear_faults()
    time.sleep(max(0.0, 5.5 - (time.monotonic() - killed_at)))  # the add_lines it sent lands
    run = sync_invoice(invoice_id)
    assert (run.outcome, run.stripe_writes) == ("unchanged", 0), run.error  # its lines landed, once
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)


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
        # `redis-cli shutdown nosave`: Redis goes away with every job, schedule and lock.
        try:
            redis_lib.Redis.from_url(redis_url).shutdown(nosave=True)
        except redis_lib.ConnectionError:
            pass  # the server closes the connection as it goes
        server.process.wait(timeout=10)
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
